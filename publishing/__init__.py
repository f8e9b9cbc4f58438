"""Publishing files whole, for the data tools and the engine alike: written under a temporary
name, then renamed into place (atomic.py). Only the standard library is imported, so that either
package may import it without reaching into the other."""
