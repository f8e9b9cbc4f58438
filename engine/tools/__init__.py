"""Tools that check the engine itself on any machine (not used by training): the layout check,
which compares a layout against one process, and the context-parallel attention check."""
