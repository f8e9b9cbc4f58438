"""Words for the needles' keys: "adjective-noun" pairs, as RULER draws them (its lists come from
the wonderwords package; these are our own short lists of common English words)."""
import bisect

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


class AdjectiveNounPairs:
    """RULER's key pool, ``sorted(set(f"{adj}-{noun}" for adj in adjectives for noun in
    nouns))``, indexed without building it: with wonderwords' lists that is 6.2 million strings
    (about 400 MB and 16 s in Python), which RULER builds once per generator. ``rng.choice(pool)``
    then draws exactly the element RULER's ``random.choice(words)`` draws from the same state.

    Every string of adjective A starts with "A-". Two adjectives' strings can interleave in
    sorted order only when one prefix extends the other ("blue-" and "blue-eyed-"); such a family
    is built and sorted in full (a few adjectives x the nouns). Every other adjective is one
    block of its sorted nouns, and blocks follow the order of their prefixes."""

    def __init__(self, adjectives, nouns):
        self._nouns = sorted(set(nouns))
        prefixes = sorted({adjective + "-" for adjective in adjectives})
        # Families: a prefix and the prefixes it starts (adjacent once sorted).
        families: list[list[str]] = []
        for prefix in prefixes:
            if families and prefix.startswith(families[-1][0]):
                families[-1].append(prefix)
            else:
                families.append([prefix])
        self._blocks: list[object] = []  # a prefix (one adjective) or a family's sorted strings
        self._starts: list[int] = []
        total = 0
        for family in families:
            if len(family) == 1:
                block, size = family[0], len(self._nouns)
            else:
                block = sorted({prefix + noun for prefix in family for noun in self._nouns})
                size = len(block)
            self._blocks.append(block)
            self._starts.append(total)
            total += size
        self._length = total

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} keys")
        position = bisect.bisect_right(self._starts, index) - 1
        block, offset = self._blocks[position], index - self._starts[position]
        return block + self._nouns[offset] if isinstance(block, str) else block[offset]
