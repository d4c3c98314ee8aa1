"""Reading PyTorch checkpoints without PyTorch: files written by the real torch.save, hostile pickles, damage."""

import argparse
import collections
import io
import logging
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ib_lasso_jax.interop.torch_files import (
    TorchFileError,
    UnknownGlobal,
    UnsafeCheckpointError,
    find_state_dict,
    read_checkpoint,
    read_state_dict,
    write_safetensors,
)

FORMATS = ["zip", "legacy"]


def _save(torch, obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _reference(t):
    """The tensor's values as numpy, bit for bit (numpy has no bfloat16 / float8: view the bits)."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def _assert_bitwise(arr, t):
    ref = _reference(t)
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == ref.dtype and arr.shape == ref.shape
    assert arr.tobytes() == np.ascontiguousarray(ref).tobytes()


def _small_net(torch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    net.train()
    for _ in range(3):  # moves the BatchNorm statistics and num_batches_tracked off their initial values
        net(torch.randn(2, 3, 6, 6))
    return net


@pytest.mark.parametrize("fmt", FORMATS)
def test_sequential_state_dict_bitwise(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    sd = _small_net(torch).state_dict()
    path = _save(torch, sd, tmp_path / "net.pth", fmt)
    loaded = read_checkpoint(path)
    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(sd)
    for k, t in sd.items():
        _assert_bitwise(loaded[k], t)
    assert loaded["1.num_batches_tracked"].dtype == np.int64 and loaded["1.num_batches_tracked"] == 3
    state = read_state_dict(path)
    assert list(state) == list(sd) and "_metadata" not in state
    for k, t in sd.items():
        _assert_bitwise(state[k], t)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_with_shared_storage(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    x = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    obj = {"t": x.t(), "v": x[1:, ::2], "row": x[2], "x": x, "p": torch.nn.Parameter(x[:, 1:3].clone())}
    loaded = read_checkpoint(_save(torch, obj, tmp_path / "views.pt", fmt))
    for k, t in obj.items():
        _assert_bitwise(loaded[k], t)
    # Each array owns contiguous memory: writing one leaves the others (once views of one storage) alone.
    assert all(a.flags.c_contiguous and a.flags.writeable for a in loaded.values())
    loaded["x"][:] = -1
    _assert_bitwise(loaded["t"], x.t())


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_scalars_and_empty(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g)
    obj = {
        "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(),
        "i64": torch.arange(-5, 7).reshape(3, 4), "i32": torch.arange(6, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": base > 0,
        "scalar": torch.tensor(2.5), "scalar_i64": torch.tensor(7), "empty": torch.zeros(0, 3),
        "bf16_t": base.bfloat16().t(),
    }
    if fmt == "zip":  # dtypes without a legacy storage class: _rebuild_tensor_v3 on an untyped storage
        obj["u16"] = torch.arange(5, dtype=torch.int32).to(torch.uint16)
        obj["f8"] = base.to(torch.float8_e4m3fn)
    loaded = read_checkpoint(_save(torch, obj, tmp_path / "dtypes.pt", fmt))
    for k, t in obj.items():
        if k == "u16":
            assert loaded[k].dtype == np.uint16 and loaded[k].tolist() == [0, 1, 2, 3, 4]
        else:
            _assert_bitwise(loaded[k], t)
    assert loaded["scalar"].shape == () and loaded["empty"].shape == (0, 3)


def test_plain_values_and_containers(tmp_path):
    torch = pytest.importorskip("torch")
    obj = {"size": torch.Size([2, 3]), "device": torch.device("cuda", 0), "dtype": torch.float16,
           "np_scalar": np.float64(93.9), "np_array": np.arange(4, dtype=np.int32), "set": {1, 2},
           "nested": [(1, "a", None), {"b": b"\x00\xff"}], "frozen": frozenset({3}), "cplx": 1 + 2j}
    loaded = read_checkpoint(_save(torch, obj, tmp_path / "plain.pt", "zip"))
    assert loaded["size"] == (2, 3) and loaded["device"] == "cuda:0" and loaded["dtype"] == np.float16
    assert loaded["np_scalar"] == np.float64(93.9) and loaded["np_array"].tolist() == [0, 1, 2, 3]
    for k in ("set", "nested", "frozen", "cplx"):
        assert loaded[k] == obj[k]


def _hrank_like(torch):
    net = _small_net(torch)
    sd = torch.nn.DataParallel(net).state_dict()
    assert all(k.startswith("module.") for k in sd)
    params = list(net.parameters())
    # torch.optim.SGD(momentum=0.9).state_dict() and MultiStepLR(...).state_dict() after one step, in
    # the layout torch 2.x gives them, built directly: an optimizer's first method call imports
    # torch._dynamo, which costs more CPU time than the rest of this file.
    optimizer = {
        "state": {i: {"momentum_buffer": torch.randn(p.shape)} for i, p in enumerate(params)},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0005, "nesterov": False,
                          "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                          "initial_lr": 0.1, "params": list(range(len(params)))}],
    }
    scheduler = {"milestones": collections.Counter({150: 1, 225: 1}), "gamma": 0.1, "base_lrs": [0.1],
                 "last_epoch": 1, "_step_count": 2, "_is_initial": False, "_get_lr_called_within_step": False,
                 "_last_lr": [0.1]}
    ckpt = {"state_dict": sd, "best_prec1": 93.9, "epoch": 300, "optimizer": optimizer, "scheduler": scheduler}
    return net, ckpt


def test_hrank_like_nested_legacy_checkpoint(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    net, ckpt = _hrank_like(torch)
    path = _save(torch, ckpt, tmp_path / "resnet_56.pt", "legacy")
    loaded = read_checkpoint(path)
    assert loaded["best_prec1"] == 93.9 and loaded["epoch"] == 300
    assert loaded["scheduler"]["milestones"] == collections.Counter({150: 1, 225: 1})
    for i, p in enumerate(net.parameters()):
        buf = ckpt["optimizer"]["state"][i]["momentum_buffer"]
        assert buf.shape == p.shape
        _assert_bitwise(loaded["optimizer"]["state"][i]["momentum_buffer"], buf)
    assert loaded["optimizer"]["param_groups"] == ckpt["optimizer"]["param_groups"]
    assert find_state_dict(loaded)[0] == "state_dict"
    with caplog.at_level(logging.INFO, logger="ib_lasso_jax.interop.torch_files"):
        state = read_state_dict(path)
    assert "'state_dict'" in caplog.text
    ref = net.state_dict()
    assert list(state) == list(ref)  # "module." stripped
    for k, t in ref.items():
        _assert_bitwise(state[k], t)
    # An explicit key gives the same; keys that are absent or hold no state dict are named.
    assert list(read_state_dict(path, key="state_dict")) == list(ref)
    with pytest.raises(TorchFileError, match=r"key='nope'.*best_prec1"):
        read_state_dict(path, key="nope")
    with pytest.raises(TorchFileError, match=r"key='epoch' holds a int"):
        read_state_dict(path, key="epoch")


def test_module_prefix_kept_unless_on_every_key(tmp_path):
    a = np.ones(2, np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"module.a": a, "b": a})
    assert sorted(read_state_dict(tmp_path / "m.safetensors")) == ["b", "module.a"]


def test_apib_like_thop_buffers_dropped(tmp_path):
    torch = pytest.importorskip("torch")
    net = _small_net(torch)
    for m in net.modules():  # what thop.profile leaves behind
        m.register_buffer("total_ops", torch.zeros(1, dtype=torch.float64))
        m.register_buffer("total_params", torch.zeros(1, dtype=torch.float64))
    sd = net.state_dict()
    assert "total_ops" in sd and "0.total_params" in sd
    path = _save(torch, {"model": sd, "acc": 0.93}, tmp_path / "apib.pth", "zip")
    state = read_state_dict(path)
    assert state and not any(k.endswith(("total_ops", "total_params")) for k in state)
    assert list(state) == [k for k in sd if not k.endswith(("total_ops", "total_params"))]


def test_state_dict_errors_name_the_problem(tmp_path):
    torch = pytest.importorskip("torch")
    path = _save(torch, {"weights": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "odd.pt", "zip")
    with pytest.raises(TorchFileError, match=r"odd\.pt.*'weights': dict of 1.*'epoch': int.*key="):
        read_state_dict(path)
    assert list(read_state_dict(path, key="weights")) == ["a"]
    path = _save(torch, {"state_dict": {"a": torch.ones(2), "extra": "text"}}, tmp_path / "mixed.pt", "zip")
    with pytest.raises(TorchFileError, match=r"entry 'extra' is a str, not a tensor"):
        read_state_dict(path)
    path = _save(torch, {"fc.weight": torch.ones(2), "fc.note": "text"}, tmp_path / "top.pt", "zip")
    with pytest.raises(TorchFileError, match=r"top\.pt.*looks like a state dict.*\['fc\.note'\]"):
        read_state_dict(path)
    path = _save(torch, [torch.ones(2)], tmp_path / "list.pt", "zip")
    with pytest.raises(TorchFileError, match="holds a list"):
        read_state_dict(path)


def test_safetensors_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    sd = _small_net(torch).state_dict()
    sd["extra.bf16"] = torch.randn(3, 2).bfloat16()
    # The format comes from the content, not the name.
    path = tmp_path / "model.bin"
    st_torch.save_file(dict(sd), str(path), metadata={"format": "pt"})
    state = read_state_dict(path)
    assert sorted(state) == sorted(sd)
    for k, t in sd.items():
        _assert_bitwise(state[k], t)


def test_write_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal(5).astype(ml_dtypes.float8_e4m3fn),
        "empty": np.zeros((0, 2), np.float16),
        "strided": np.arange(12, dtype=np.int32).reshape(3, 4).T,
        "mask": np.array([True, False]),
    }
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old contents")
    write_safetensors(path, tensors, metadata={"source": "test"})
    assert os.listdir(tmp_path) == ["out.safetensors"]  # no temporary file left behind
    back = read_state_dict(path)
    assert sorted(back) == sorted(tensors)
    for k, a in tensors.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        assert back[k].tobytes() == np.ascontiguousarray(a).tobytes()
    import safetensors

    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"source": "test"}
    with pytest.raises(TypeError, match="metadata must map str to str"):
        write_safetensors(path, tensors, metadata={"n": 1})
    with pytest.raises(TypeError, match=r"tensors\['o'\]"):
        write_safetensors(path, {"o": np.array([object()])})
    assert sorted(read_state_dict(path)) == sorted(tensors)  # a failed write leaves the old file


# ---------------------------------------------------------------------------------------------
# Hostile pickles
# ---------------------------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _UserClass:
    def __init__(self):
        self.value = 1


def test_zip_pickle_calling_os_system_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = _save(torch, {"w": torch.ones(2), "evil": _RunsCommand(f"touch {marker}")}, tmp_path / "evil.pt", "zip")
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.system") as info:
        read_checkpoint(path)
    assert "evil.pt" in str(info.value) and "state_dict()" in str(info.value)
    assert isinstance(info.value, TorchFileError) and isinstance(info.value, ValueError)
    assert not marker.exists()
    # Stubbed, the call is recorded, never made; the tensors still come through.
    loaded = read_checkpoint(path, unknown="stub")
    assert not marker.exists()
    evil = loaded["evil"]
    assert isinstance(evil, UnknownGlobal) and evil.name == "system" and evil.dangerous
    assert evil.args == (f"touch {marker}",)
    assert loaded["w"].tolist() == [1.0, 1.0]


def _legacy_bytes(obj_pickle: bytes, keys=()) -> bytes:
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                        "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    return head + obj_pickle + pickle.dumps(list(keys), protocol=2)


def test_legacy_pickle_calling_eval_is_refused_and_stubbed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",)

    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(_legacy_bytes(pickle.dumps({"a": 1, "evil": Evil()}, protocol=2)))
    # Python 3 writes builtins as __builtin__ in protocol-2 pickles; the error names it as the file does.
    with pytest.raises(UnsafeCheckpointError, match=r"__builtin__\.eval.*hostile") as info:
        read_checkpoint(path)
    assert "evil_legacy.pth" in str(info.value)
    assert not marker.exists()
    loaded = read_checkpoint(path, unknown="stub")
    assert not marker.exists()
    assert loaded["a"] == 1 and loaded["evil"].module == "__builtin__" and loaded["evil"].name == "eval"
    assert loaded["evil"].dangerous
    # A plain pickle (no torch magic number) is refused the same way before anything else.
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"__builtin__\.eval"):
        read_checkpoint(path)
    assert not marker.exists()


def test_training_args_and_user_classes(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"fc.weight": torch.ones(2, 2)}
    ckpt = {"args": argparse.Namespace(lr=0.1, arch="resnet_56"), "net": sd, "extra": _UserClass()}
    path = _save(torch, ckpt, tmp_path / "with_args.pt", "legacy")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*unknown='stub'"):
        read_state_dict(path)
    loaded = read_checkpoint(path, unknown="stub")
    assert loaded["args"].state == {"lr": 0.1, "arch": "resnet_56"}
    assert f"{_UserClass.__module__}._UserClass" in repr(loaded["extra"]).replace("UnknownGlobal ", "")
    assert read_state_dict(path, unknown="stub")["fc.weight"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match=r"unknown='maybe'.*'refuse', 'stub'"):
        read_checkpoint(path, unknown="maybe")


def test_crafted_tensor_record_out_of_bounds(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "ok.pt"
    torch.save({"a": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    # torch names the archive's folder after the file.
    pkl = entries["ok/data.pkl"]
    # size (4,) -> (40,): a record that would read past its 4-element storage.
    entries["ok/data.pkl"] = pkl.replace(b"K\x04\x85", b"K(\x85", 1)
    assert entries["ok/data.pkl"] != pkl
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    with pytest.raises(TorchFileError, match=r"bad\.pt.*storage of 4 elements"):
        read_checkpoint(bad)


# ---------------------------------------------------------------------------------------------
# Archive variants and damage
# ---------------------------------------------------------------------------------------------


def _rewrite_zip(src, dst, rename=None, transform=None):
    with zipfile.ZipFile(src) as z:
        entries = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for n, b in entries:
            if transform:
                b = transform(n, b)
            z.writestr(rename(n) if rename else n, b)
    return dst


def test_zip_folder_name_and_byteorder(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    src = tmp_path / "src.pt"
    torch.save({"x": x}, src)
    # The folder is named after the file when saved to a path, "archive" when saved to a buffer.
    renamed = _rewrite_zip(src, tmp_path / "renamed.pt", rename=lambda n: n.replace("src/", "archive/", 1))
    assert "archive/data.pkl" in zipfile.ZipFile(renamed).namelist()
    _assert_bitwise(read_checkpoint(renamed)["x"], x)

    def big_endian(name, data):
        if name.endswith("byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data

    big = _rewrite_zip(src, tmp_path / "big.pt", transform=big_endian)
    out = read_checkpoint(big)["x"]
    _assert_bitwise(out, x)
    assert out.dtype.isnative


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("ckpts")
    obj = {"state_dict": _small_net(torch).state_dict(), "epoch": 3}
    return {fmt: _save(torch, obj, d / f"{fmt}.pt", fmt).read_bytes() for fmt in FORMATS}


def _first_storage(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("serialization_id"))


def _legacy_layout(data):
    """Offsets in a legacy file: (object pickle start, key list start, first storage start)."""
    f = io.BytesIO(data)
    for _ in range(3):
        pickle.load(f)
    obj_start = f.tell()
    import pickletools

    for _op, _arg, _pos in pickletools.genops(f):
        pass
    keys_start = f.tell()
    pickle.load(f)
    return obj_start, keys_start, f.tell()


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, torch_files, fmt):
    data = torch_files[fmt]
    if fmt == "zip":
        info = _first_storage(data)
        cuts = [4, 100, info.header_offset + 40, len(data) // 2, len(data) - 30, len(data) - 1]
    else:
        obj_start, keys_start, storages_start = _legacy_layout(data)
        cuts = [3, obj_start + 20, keys_start - 1, keys_start + 5, storages_start + 4, storages_start + 12,
                len(data) - 1]
    for cut in cuts:
        path = tmp_path / f"cut_{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(TorchFileError, match=f"cut_{cut}.pt") as info:
            read_checkpoint(path)
        assert not isinstance(info.value, UnsafeCheckpointError), (cut, info.value)


def test_damaged_storage_fails_crc(tmp_path, torch_files):
    data = bytearray(torch_files["zip"])
    info = _first_storage(bytes(data))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(TorchFileError, match=rf"flipped\.pt.*'{info.filename}'.*CRC"):
        read_checkpoint(path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "full.safetensors"
    write_safetensors(path, {"a": np.arange(100, dtype=np.float32), "b": np.ones(3, ml_dtypes.bfloat16)})
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    for cut in (12, 8 + n - 3, 8 + n + 10, len(data) - 1):
        cut_path = tmp_path / f"cut_{cut}.safetensors"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(TorchFileError, match=f"cut_{cut}.safetensors"):
            read_checkpoint(cut_path)


def test_not_checkpoints(tmp_path):
    cases = {"empty.pt": b"", "text.pt": b"hello, this is not a checkpoint\n", "short.pt": b"\x80",
             "zip.pt": None, "garbage.pt": b"\x80\x02" + os.urandom(64)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hi")
    cases["zip.pt"] = buf.getvalue()
    messages = {"empty.pt": "empty", "text.pt": "not a checkpoint", "zip.pt": "without data.pkl"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TorchFileError, match=rf"{name}.*{messages.get(name, '')}"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(TorchFileError, match=r"missing\.pt: no such file"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(TorchFileError, match="is a directory"):
        read_state_dict(tmp_path)
