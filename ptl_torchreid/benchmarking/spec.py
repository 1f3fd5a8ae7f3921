"""What a benchmark compares: :class:`ModelSpec`, one column of a comparison, and its command-line form."""
import dataclasses
import json

__all__ = ["ModelSpec", "parse_spec"]


@dataclasses.dataclass
class ModelSpec:
    """One column of the comparison.

    ``label``: column name; ``name``: ``model.name``; ``opts``: extra ``KEY VALUE`` config overrides (strings);
    ``builder``: optional ``'module:function'`` with signature ``(cfg, num_classes) -> model`` used instead of
    ``ptl_torchreid.engine.build_model`` (a pruned model, for instance); it is imported by name, so the memory probe's
    subprocess can build the same model; ``extra_evals``: ``{label: cell options}`` -- after training, the same
    weights are evaluated again with these cell options (``eval_state`` only affects evaluation, so this equals
    training a model with that setting); ``group``: ``'main'`` (full cost measurements) or ``'ablation'``.
    """

    label: str
    name: str
    opts: tuple = ()
    builder: str = ""
    extra_evals: dict = dataclasses.field(default_factory=dict)
    group: str = "main"
    note: str = ""

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        d["opts"] = tuple(d.get("opts", ()))
        return cls(**d)


def parse_spec(text):
    """``LABEL=MODEL[@module:function][,KEY=VALUE...]`` -> ModelSpec (an extra column, e.g. a pruned model)."""
    head, *pairs = text.split(",")
    if "=" not in head:
        raise SystemExit(f"--spec {text!r}: expected LABEL=MODEL[@module:function][,KEY=VALUE...]")
    label, model = head.split("=", 1)
    model, _, builder = model.partition("@")
    opts = []
    for p in pairs:
        k, _, v = p.partition("=")
        opts += [k, v]
    return ModelSpec(label, model, tuple(opts), builder=builder)
