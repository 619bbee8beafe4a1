import pytest
import torch

from adl_cli.engine import checkpoint as ckpt
from adl_cli.errors import AdlError
from adl_cli.models.gpt import GPT, GPTConfig


def model(n_embd=32):
    return GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=n_embd))


def test_weights_round_trip_without_tied_duplicates_or_compile_prefix(tmp_path):
    m = model()
    path = tmp_path / "m.safetensors"
    ckpt.save_weights(torch.compile(m), path)
    keys = ckpt.read_safetensors(path).keys()
    assert "lm_head.weight" not in keys or "transformer.wte.weight" not in keys
    assert not any("_orig_mod" in k for k in keys)
    m2 = model()
    ckpt.load_weights(m2, path)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert m2.lm_head.weight is m2.transformer.wte.weight


def test_truncated_and_garbage_files_are_clear_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    ckpt.save_weights(model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdlError, match="truncated or not a safetensors"):
        ckpt.load_weights(model(), path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdlError, match="truncated or not a safetensors"):
        ckpt.load_weights(model(), path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    ckpt.save_weights(model(32), path)
    with pytest.raises(AdlError, match=r"does not match the model: 'transformer\.\S+' has shape"):
        ckpt.load_weights(model(64), path)


def test_keep_only_newest_checkpoints(tmp_path):
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, m, opt, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-2", "step-3"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-3"


def test_files_and_checkpoint_folders_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        m = model()
        path = ckpt.save_checkpoint(tmp_path, 1, m, torch.optim.AdamW(m.parameters()), {}, keep=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "checkpoints" / "latest").stat().st_mode) == 0o644


def test_resaving_a_step_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    first = ckpt.save_checkpoint(tmp_path, 4, m, opt, {"mark": "old"}, keep=2)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 4, m, opt, {"mark": "new"}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == first and '"mark": "old"' in (first / "state.json").read_text()
    # a crash after the old folder was moved aside and before the new one arrived: found again
    import os

    os.replace(first, tmp_path / "checkpoints" / ".old-step-4-abc")
    assert ckpt.latest_checkpoint(tmp_path) == first and (first / "state.json").exists()
