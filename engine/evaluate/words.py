"""Words for the needles' keys: "adjective-noun" pairs, as RULER draws them (its lists come from
the wonderwords package; these are our own short lists of common English words)."""

ADJECTIVES = (
    "able", "absent", "ancient", "angry", "anxious", "average", "awake", "bitter", "blind",
    "bold", "brave", "brief", "bright", "broad", "busy", "calm", "careful", "cheap", "clean",
    "clever", "cold", "cozy", "crisp", "cruel", "curious", "damp", "daring", "deep", "dense",
    "dizzy", "dry", "dusty", "eager", "early", "empty", "equal", "exotic", "faint", "famous",
    "fancy", "fierce", "flat", "fluffy", "fond", "fragile", "fresh", "friendly", "funny",
    "gentle", "giant", "glad", "gloomy", "golden", "grand", "greedy", "grumpy", "hasty",
    "heavy", "hollow", "honest", "humble", "hungry", "icy", "idle", "jolly", "keen", "kind",
    "lazy", "lively", "lonely", "loud", "lucky", "mellow", "messy", "mighty", "modern",
    "narrow", "nervous", "noble", "odd", "orange", "plain", "polite", "proud", "quick",
    "quiet", "rapid", "rare", "rough", "royal", "rusty", "sandy", "scarce", "shiny", "silent",
    "silly", "sleepy", "slim", "smooth", "soft", "sour", "spicy", "steady", "sticky", "stormy",
    "strange", "sturdy", "sunny", "swift", "tame", "tender", "tidy", "tiny", "vast", "warm",
    "wary", "wild", "windy", "wise", "witty", "wooden", "young", "zealous",
)

NOUNS = (
    "anchor", "apple", "arrow", "attic", "badge", "bakery", "balloon", "banjo", "barn",
    "basket", "bathroom", "beacon", "bicycle", "blanket", "bottle", "bridge", "bucket",
    "cabin", "camera", "candle", "canyon", "carpet", "castle", "cellar", "chimney", "circus",
    "cloud", "compass", "cottage", "crayon", "crown", "cushion", "desert", "diamond",
    "dolphin", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fence", "ferry",
    "fiddle", "forest", "fountain", "garden", "garlic", "glacier", "goblet", "guitar",
    "hammer", "harbor", "helmet", "hill", "island", "jacket", "jungle", "kettle", "kitten",
    "ladder", "lantern", "lemon", "library", "lizard", "magnet", "mango", "meadow", "mirror",
    "mitten", "monkey", "mountain", "needle", "notebook", "oasis", "orchard", "otter",
    "oyster", "paddle", "palace", "parrot", "pebble", "pencil", "pepper", "piano", "pillow",
    "planet", "pocket", "puzzle", "rabbit", "raft", "ribbon", "river", "rocket", "saddle",
    "sailboat", "scarf", "shovel", "spoon", "squirrel", "stable", "statue", "teapot",
    "temple", "thimble", "ticket", "tiger", "tractor", "trumpet", "tunnel", "turtle",
    "umbrella", "valley", "violin", "wagon", "walnut", "whistle", "window", "zebra",
)
