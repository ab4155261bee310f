from dataclasses import replace

import pytest
import torch

from thresher.artifact import Artifact, ArtifactError, ModelIdentity, load_artifact

IDENTITY = ModelIdentity(
    name="tiny", architecture="LlamaForCausalLM", num_layers=2, hidden_size=8, intermediate_size=12,
    num_heads=2, num_kv_heads=1, fingerprint="0123456789abcdef",
)


def _artifact() -> Artifact:
    torch.manual_seed(0)
    thresholds = {}
    for name, group in IDENTITY.tensor_names():
        table = torch.rand(3, IDENTITY.in_features(group))
        table[0] = 0
        thresholds[name] = table
    return Artifact(IDENTITY, [0.0, 0.25, 0.5], "channel-greedy", thresholds, {"tokens": 100})


def test_round_trip(tmp_path):
    original = _artifact()
    original.save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a", model=IDENTITY)
    assert loaded.model == IDENTITY and loaded.levels == [0.0, 0.25, 0.5] and loaded.method == "channel-greedy"
    assert loaded.calibration == {"tokens": 100}
    for name, table in original.thresholds.items():
        assert torch.equal(loaded.thresholds[name], table)
    assert loaded.level_index(0.5) == 2
    with pytest.raises(ArtifactError, match=r"level 0.4 was not calibrated; available levels: \[0.0, 0.25, 0.5\]"):
        loaded.level_index(0.4)


def test_wrong_model_names_both_models(tmp_path):
    _artifact().save(tmp_path / "a")
    other = replace(IDENTITY, name="other-model", fingerprint="fedcba9876543210")
    with pytest.raises(ArtifactError, match="calibrated for model 'tiny'.*model given is 'other-model'"):
        load_artifact(tmp_path / "a", model=other)


def test_same_weights_under_another_name_are_accepted(tmp_path):
    _artifact().save(tmp_path / "a")
    load_artifact(tmp_path / "a", model=replace(IDENTITY, name="renamed-copy"))


def test_damaged_thresholds_file(tmp_path):
    _artifact().save(tmp_path / "a")
    path = tmp_path / "a" / "thresholds.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="thresholds.safetensors is damaged"):
        load_artifact(tmp_path / "a")


def test_missing_file_and_missing_manifest(tmp_path):
    _artifact().save(tmp_path / "a")
    (tmp_path / "a" / "thresholds.safetensors").unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        load_artifact(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not a thresher artifact"):
        load_artifact(tmp_path / "empty")


def test_damaged_manifest(tmp_path):
    _artifact().save(tmp_path / "a")
    manifest = tmp_path / "a" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(ArtifactError, match="manifest.json is damaged"):
        load_artifact(tmp_path / "a")


def test_tables_of_the_wrong_shape_are_refused(tmp_path):
    artifact = _artifact()
    artifact.thresholds["layers.1.down"] = torch.zeros(3, 8)
    with pytest.raises(ArtifactError, match=r"layers.1.down have shape \(3, 8\), expected \(3, 12\)"):
        artifact.save(tmp_path / "a")
    assert not (tmp_path / "a" / "manifest.json").exists()
