"""The launch layer of the scripts in examples/: their settings (one table), the recipe's stage
logic and the SLURM batch step, behind `python -m engine.recipe STAGE`. The scripts stay thin
wrappers: their header comment (printed by --help) and one line handing over to this package."""
