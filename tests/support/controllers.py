"""Controllers used by several tests."""
from editkit.core.attention import AttentionController


class PassThrough(AttentionController):
    """Acts on every call and changes nothing; with `probs` it also materialises the probabilities."""

    def __init__(self, probs=False):
        self.probs = probs

    def acts_on(self, call):
        return True

    def needs_probs(self, call):
        return self.probs
