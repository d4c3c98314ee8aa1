"""``ib-lasso export``, ``import`` and ``latency``: a saved model out to a deployment format, a published
checkpoint in, and measured latency."""

from __future__ import annotations

import json
from pathlib import Path

from ib_lasso_jax.cli.common import refuse_overlap


def cmd_export(args) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.deploy import export

    out = Path(args.out).expanduser()
    refuse_overlap(args, "--out", args.out, [out], "a file outside the checkpoint directory")
    if args.format == "torch":
        return _export_torch(args, out)
    if args.family is not None:
        raise ValueError(f"--family {args.family!r} applies to --format torch only; got --format {args.format}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be a positive integer; got {args.batch}")
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a directory; expected a file name (e.g. model.onnx)")
    model = checkpoint.restore_model(args.checkpoint)  # reads only
    try:
        info = export.export_model(model, out, format=args.format, batch=args.batch)
        errors = export.verify(model, out, format=args.format) if args.check else None
    except ImportError as e:  # the onnx extra is missing: one clear line
        raise ValueError(str(e)) from e
    if args.json:
        print(json.dumps(info.to_dict() | ({"max_rel_error": errors} if errors else {})))
        return 0
    b = "symbolic" if info.batch is None else info.batch
    print(f"{info.format} written to {info.path}: {info.size_bytes / 1e6:.2f} MB, batch {b}, {info.seconds:.1f} s")
    if errors:
        print("max relative error against the model: " + ", ".join(f"batch {k}: {v:.1e}" for k, v in errors.items()))
    return 0


def _export_torch(args, out: Path) -> int:
    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.interop import torch_models

    if args.family is None:
        raise ValueError(f"--format torch needs --family (the PyTorch key names to write); valid families: "
                         f"{sorted(torch_models.FAMILIES)}")
    fam = torch_models.family(args.family)
    if args.batch is not None or args.check:
        raise ValueError("--batch and --check apply to --format stablehlo/onnx; a state dict has no batch size")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out!r} must end in .safetensors (the PyTorch state dict is written in that "
                         f"format; its widths go to {out.name}.json beside it)")
    model = checkpoint.restore_model(args.checkpoint)  # reads only
    spec = model.spec
    if spec.name != fam.zoo:
        raise ValueError(f"--family {fam.name} writes zoo model {fam.zoo!r}, but --checkpoint {args.checkpoint!r} "
                         f"holds {spec.name!r}; families for it: "
                         f"{sorted(n for n, f in torch_models.FAMILIES.items() if f.zoo == spec.name) or 'none'}")
    path = torch_models.save_torch(out, model, fam.name, overwrite=True)
    info = {"format": "torch", "family": fam.name, "path": str(path), "widths_json": f"{path}.json",
            "size_bytes": path.stat().st_size}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"PyTorch state dict ({fam.name} key names) written to {path}: {info['size_bytes'] / 1e6:.2f} MB; "
              f"widths in {path}.json")
    return 0


def _parse_shape(flag: str, text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{flag} must be H,W,C (three positive integers, e.g. 32,32,3); got {text!r}")
    return shape


def cmd_import(args) -> int:
    import hashlib

    from ib_lasso_jax import checkpoint
    from ib_lasso_jax.interop import torch_files, torch_models

    fam = torch_models.family(args.format)
    src = Path(args.input).expanduser()
    if not src.is_file():
        raise ValueError(f"--input {args.input!r} is not a file; expected a .pt/.pth/.safetensors checkpoint")
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {args.out!r} exists; pass --overwrite to replace it, or choose another directory")
    try:
        model, report = torch_models.load_torch(src, fam.name, strict=not args.no_strict, key=args.key,
                                                input_shape=_parse_shape("--input-shape", args.input_shape),
                                                report=True)
    except torch_files.TorchFileError as e:
        raise ValueError(str(e)) from e
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = {"imported_from": {"file": str(src.resolve()), "sha256": digest, "family": fam.name,
                              "source": fam.source, "skipped": report.problems}}
    checkpoint.save_model(out, model, metadata=meta, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"out": str(out), "family": fam.name, "zoo_model": fam.zoo, "widths": report.widths,
                          "num_classes": report.num_classes, "loaded": report.loaded, "skipped": report.problems}))
        return 0
    print(f"imported {src} ({fam.name}) as zoo model {fam.zoo} with {report.num_classes} classes into {out} "
          f"({report.loaded} arrays)")
    for line in report.problems:
        print(f"  skipped: {line}")
    return 0


def cmd_latency(args) -> int:
    from ib_lasso_jax import checkpoint, models
    from ib_lasso_jax.deploy import latency

    for flag, value in (("--checkpoint", args.checkpoint), ("--original", args.original)):
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(f"{flag} {value!r} is not a directory; expected a model checkpoint directory "
                             "(checkpoint.save_model, or OUT/model of `ib-lasso prune`)")
    if args.runtime not in latency.RUNTIMES:
        raise ValueError(f"--runtime {args.runtime!r} is not valid; valid values: {', '.join(latency.RUNTIMES)}")
    try:
        batches = tuple(int(v) for v in args.batch.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {args.batch!r} is not valid; valid values: comma-separated positive integers "
                         "(batch sizes), e.g. 1,64")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} is not valid; valid values: a positive integer (samples per "
                         "batch size, e.g. 10)")

    def restore(flag, value):
        try:
            return checkpoint.restore_model(value)  # reads only
        except checkpoint.CheckpointError as e:
            raise ValueError(f"{flag} {value!r}: {e}") from e

    pruned = restore("--checkpoint", args.checkpoint)
    original, source = None, None
    if args.original is not None:
        original, source = restore("--original", args.original), args.original
    else:  # `ib-lasso prune` saves its report as the model's metadata: the original's widths are in it
        meta = checkpoint.load_metadata(args.checkpoint)
        before = meta.get("widths_before") if isinstance(meta, dict) else None
        if before is not None and before != pruned.spec.widths:
            original = models.create_from_spec(pruned.spec.replace_widths(before))
            source = ("widths_before of the checkpoint's pruning report (random weights: latency does not depend on "
                      "them)")
    if original is not None and tuple(original.spec.input_shape) != tuple(pruned.spec.input_shape):
        raise ValueError(f"--original {args.original!r} takes input {tuple(original.spec.input_shape)}, --checkpoint "
                         f"{args.checkpoint!r} takes {tuple(pruned.spec.input_shape)}; expected the same input shape")
    kwargs = {"batch_sizes": batches, "runtime": args.runtime, "repeats": args.repeats}
    try:
        result = (latency.compare(original, pruned, **kwargs) if original is not None
                  else latency.measure(pruned, **kwargs))
    except ImportError as e:  # the onnx extra is missing: one clear line
        raise ValueError(f"--runtime {args.runtime}: {e}") from e
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "original_from": source, **result.to_dict()}))
        return 0
    device = result.pruned.device if original is not None else result.device
    print(f"{pruned.spec.name} from {args.checkpoint} on {args.runtime} ({device}), input "
          f"{'x'.join(map(str, pruned.spec.input_shape))}; median of {args.repeats} samples, compilation excluded")
    if original is None:
        print(result.format_table())
        print("(no original known: give --original DIR for the speed-up)")
    else:
        print(f"original: {source}")
        print(result.format_table())
    return 0
