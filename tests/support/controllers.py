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


class Recorder(AttentionController):
    """Records what reaches it, per (site name, step): q and k of the attention sites `attention(site)`
    accepts, and the features of the feature sites `features(site)` accepts. Put it after the controllers
    under test: it sees their edits. `runs` holds one dict per finished run: (site, step) -> list of calls."""

    def __init__(self, attention=lambda site: False, features=lambda site: False):
        self.attention, self.features = attention, features
        self.runs = []

    def wants_site(self, site):
        return self.attention(site)

    def acts_on(self, call):
        return self.attention(call.site)

    def new_run_state(self):
        return {}

    def edit_qkv(self, call, q, k, v):
        call.state(self).setdefault((call.site.name, call.step), []).append(
            {"q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone(), "layout": call.layout,
             "heads": call.heads, "grid": call.grid, "bias": None})
        return q, k, v

    def edit_bias(self, call, k, bias):
        if bias is not None:   # the key bias of the controllers before, for the call edit_qkv just recorded
            call.state(self)[(call.site.name, call.step)][-1]["bias"] = bias.detach().clone()
        return bias

    def wants_feature(self, site):
        return self.features(site)

    def edit_features(self, call, features):
        call.state(self).setdefault((call.site.name, call.step), []).append(
            {"h": features.detach().clone(), "layout": call.layout})
        return features

    def end_run(self, state, success):
        if success:
            self.runs.append(state)
