"""jaxaccel.stages: the stage schema — kinds, sections and their defaults, what `expand`
turns a config into (IMP rounds written out, every stage validated), Han's iterative pruning
as stages, and a stage's optimizer."""
import re

import pytest

from jaxaccel import config as config_lib, stages


def pipeline_config():
    """A train → prune → finetune → quantize → evaluate config (schema checks only)."""
    c = config_lib.default_config()
    c.dataset.name = "digits"
    c.model.name = "lenet300_100"
    c.stages = (
        stages.stage("train", "train", steps=60),
        stages.stage("prune", "prune", prune={"method": "one_shot", "sparsity": 0.8}),
        stages.stage("finetune", "train", steps=30, optimizer={"lr": 2e-4}),
        stages.stage("quantize", "quantize", quant={"mode": "ptq", "calibration_batches": 2}),
        stages.stage("evaluate", "evaluate"),
    )
    return c


def test_a_stage_has_every_section_field_with_its_default():
    s = stages.stage("p", "prune", prune={"method": "one_shot", "sparsity": 0.5})
    assert (s.name, s.kind, s.steps, s.rewind) == ("p", "prune", 0, "snapshot")
    assert s.prune.sparsity == 0.5 and s.prune.granularity == "unstructured"
    assert s.prune.to_dict().keys() == stages.prune_defaults().to_dict().keys()
    assert s.quant.to_dict() == stages.quant_defaults().to_dict()  # untouched: the defaults
    with pytest.raises(ValueError, match="stage 'p' prune: unknown key 'sparsty'; did you mean "
                                         "sparsity"):
        stages.stage("p", "prune", prune={"sparsty": 0.5})
    with pytest.raises(ValueError, match=r"stage 'q' quant.weight_bits='8': expected int"):
        stages.stage("q", "quantize", quant={"weight_bits": "8"})


def test_choices_name_every_kind():
    assert stages.choices()["kind"] == stages.KINDS == (
        "train", "prune", "rewind", "quantize", "evaluate", "cluster")
    assert stages.choices()["rewind"] == stages.REWIND_TO
    assert stages.choices()["cluster.init"] == ("linear", "random", "density")


def test_a_config_without_stages_is_one_train_stage():
    c = config_lib.default_config()
    c.num_steps = 17
    (only,) = stages.expand(c)
    assert (only.name, only.kind, only.steps) == ("train", "train", 17)
    c.stages = (stages.stage("a", "train", steps=1), stages.stage("a", "evaluate"))
    with pytest.raises(ValueError, match=r"stages\[1\].name='a' is used twice"):
        stages.expand(c)
    c.stages, c.imp.rounds = (stages.stage("a", "train", steps=1),), 1
    with pytest.raises(ValueError, match="either stages or imp.rounds"):
        stages.expand(c)


def test_a_stage_optimizer_overrides_the_configs():
    c = pipeline_config()
    finetune = stages.expand(c)[2]
    opt = stages.stage_optimizer(c, finetune)
    assert opt.lr == 2e-4 and opt.name == c.optimizer.name and c.optimizer.lr == 1e-3
    bad = stages.stage("t", "train", steps=1, optimizer={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="optimizer.learning_rate is not an optimizer field"):
        stages.stage_optimizer(c, bad)


def test_imp_rounds_expand():
    c = pipeline_config()
    c.stages = ()
    c.imp.rounds = 2
    c.imp.steps = 5
    names = [s.name for s in stages.expand(c)]
    assert names == ["round0/train", "round1/prune", "round1/rewind", "round1/train",
                     "round2/prune", "round2/rewind", "round2/train"]


@pytest.mark.parametrize("stage_kwargs,needle", [
    ({"kind": "shrinkify"}, "kind='shrinkify'"),
    ({"kind": "prune", "prune": {"method": "gradual"}}, "one_shot or imp"),
    ({"kind": "train", "steps": 5, "quant": {"mode": "ptq"}}, "qat"),
    ({"kind": "quantize", "quant": {"mode": "ptq", "weight_bits": 9}}, "weight_bits=9"),
    ({"kind": "prune", "prune": {"method": "one_shot", "sparsity": 1.5}}, "sparsity=1.5"),
    ({"kind": "evaluate", "prune": {"method": "gradual"}},
     "stages[0] (s).prune.method='gradual' is not valid for an evaluate stage; "
     "choose one of: none, one_shot"),
    ({"kind": "evaluate", "prune": {"method": "one_shot", "sparsity": 1.0}}, "sparsity=1.0"),
])
def test_bad_stages(stage_kwargs, needle):
    c = pipeline_config()
    kind = stage_kwargs.pop("kind")
    c.stages = (stages.stage("s", kind, **stage_kwargs),)
    with pytest.raises(ValueError, match=re.escape(needle)) as e:
        stages.expand(c)
    assert "\n" not in str(e.value)


def test_iterative_pruning_stages_follow_han_schedule():
    final = {"fc1/kernel": 0.92, "fc3/kernel": 0.74}
    st = stages.iterative_pruning(final, rounds=3, dense_steps=100, retrain_steps=3200,
                                  retrain_optimizer={"lr": 1e-4})
    assert [s.name for s in st] == ["dense", "no_retrain", "round1/prune", "round1/retrain",
                                    "round2/prune", "round2/retrain", "round3/prune", "retrain"]
    assert st[1].kind == "evaluate" and st[1].prune.per_layer.to_dict() == final
    retrains = [s for s in st[2:] if s.kind == "train"]
    assert [s.steps for s in retrains] == [1067, 1067, 1066]
    assert all(s.optimizer.lr == 1e-4 for s in retrains)
    for r, p in enumerate([s for s in st if s.kind == "prune"], start=1):
        for k, v in final.items():  # keep ratio final_keep ** (r / 3)
            assert abs((1 - p.prune.per_layer[k]) - (1 - v) ** (r / 3)) < 1e-12
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        stages.iterative_pruning(final, rounds=0, dense_steps=1, retrain_steps=1)
