"""Recipe schema: every bundled recipe validates; errors name the key, file and line."""

from pathlib import Path

import pytest

from camera_pl.workflows.recipe import STEP_TYPES, PruneStep, RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_bundled_recipes_exist_and_validate():
    names = {p.stem for p in RECIPES}
    assert {"compress_recover", "gradual_prune_finetune", "analysis", "camera_q_2bit", "mc_pmq", "mc_reproduce"} <= names
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.steps and recipe.model.name


def test_overrides(tmp_path):
    recipe = load_recipe(RECIPES[0].parent / "compress_recover.yaml",
                         ["data.batch_size=2", "steps.2.prune.ratio=0.6", "model.name=/some/dir"])
    assert recipe.data.batch_size == 2 and recipe.model.name == "/some/dir"
    prune = [s for kind, s in recipe.steps if kind == "prune"][0]
    assert isinstance(prune, PruneStep) and prune.ratio == 0.6
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(RECIPES[0], ["data.batch_size"])


@pytest.mark.parametrize("text, message", [
    ("name: x\nsteps:\n  - prune: {ratoi: 0.4}\n", r"bad.yaml:3: unknown key 'ratoi' in 'prune'"),
    ("name: x\nsteps:\n  - prune:\n      ratio: high\n", r"bad.yaml:4: 'prune.ratio' must be float, got 'high'"),
    ("name: x\ndata: {batch_size: 2.5}\nsteps:\n  - save: {}\n", r"bad.yaml:2: 'data.batch_size' must be int"),
    ("name: x\nsteps:\n  - explode: {}\n", r"bad.yaml:3: unknown step 'explode'"),
    ("name: x\nmodle: {}\nsteps:\n  - save: {}\n", r"bad.yaml:2: unknown top-level key 'modle'"),
    ("name: x\nsteps: []\n", r"'steps' must be a non-empty list"),
    ("name: [unclosed\n", r"not valid YAML"),
])
def test_errors_name_key_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_steps_declare_what_they_do(tmp_path):
    import dataclasses

    for kind, cls in STEP_TYPES.items():
        flags = {name: getattr(cls, name) for name in ("changes_model", "checkpoint", "installs_hooks")}
        assert all(isinstance(v, bool) for v in flags.values()) and set(flags) & set(vars(cls)) == set(flags), kind
        assert not flags.keys() & {f.name for f in dataclasses.fields(cls)}, kind  # not recipe options
        assert not flags["changes_model"] or flags["checkpoint"], f"{kind}: a model change needs a checkpoint"
        assert not (flags["changes_model"] and flags["installs_hooks"]), f"{kind}: a replay would change the model twice"
    assert {k for k, c in STEP_TYPES.items() if c.changes_model} == {"prune", "recover", "finetune", "quantize",
                                                                     "compressed_experts"}
    assert {k for k, c in STEP_TYPES.items() if c.installs_hooks} == {"odp"}
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps:\n  - odp: {installs_hooks: false}\n")
    with pytest.raises(RecipeError, match="bad.yaml:3: unknown key 'installs_hooks' in 'odp'"):
        load_recipe(path)


def test_steps_are_the_library_configs(tmp_path):
    """Recipe steps accept exactly the options of the Python API's config objects, validated the same way."""
    import camera_pl
    from camera_pl.workflows.recipe import PruneStep, QuantizeStep

    assert issubclass(PruneStep, camera_pl.PruneConfig) and issubclass(QuantizeStep, camera_pl.QuantizeConfig)
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nsteps:\n  - prune: {ratio: 0.3, allocation: global, max_layer_ratio: 0.5}\n"
                    "  - quantize: {avg_bits: 2.5, bit_choices: [1, 2, 3], groups: null}\n")
    recipe = load_recipe(path)
    (_, prune), (_, quant) = recipe.steps
    assert prune.max_layer_ratio == 0.5 and quant.bit_choices == (1, 2, 3)
    assert recipe.to_dict()["steps"][1]["quantize"]["bit_choices"] == [1, 2, 3]  # YAML/JSON-plain
    path.write_text("name: r\nsteps:\n  - prune: {ratio: 0.3, allocation: gloabl}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3.*allocation='gloabl'.*Did you mean 'global'"):
        load_recipe(path)
    path.write_text("name: r\nsteps:\n  - prune: {ratio: 0.3, sequential: true, allocation: global}\n")
    with pytest.raises(RecipeError, match="sequential"):
        load_recipe(path)
