"""The ``offload`` command. Each verb is a function ``_cmd_<verb>(args)`` with its own parser and examples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    """Fine-tune the built-in small GPT with everything offloaded, then report."""
    from offload import demo

    return 130 if demo.run(args)["interrupted"] else 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Start a training script with the runtime configured from a file and overrides."""
    from offload.launch import launch

    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    return launch(args.script, script_args, config_path=args.config, overrides=args.set or [], nproc=args.nproc,
                  report_dir=args.report)


def _cmd_store(args: argparse.Namespace) -> int:
    """Inspect or verify an NVMe store directory."""
    from storage import NvmeStore, StoreError, format_bytes

    try:
        store = NvmeStore(args.paths, readonly=True)  # inspecting a store must never change it
    except (StoreError, ValueError) as e:
        print(f"offload store: {e}", file=sys.stderr)
        return 2
    with store:
        bad = store.verify() if args.action == "verify" else {}
        chunks = [store.info(k) for k in store.keys()]
        if args.json:
            print(json.dumps({"paths": store.paths, "capacity_bytes": store.capacity_bytes,
                              "free_bytes": store.free_bytes, "direct": store.direct,
                              "chunks": [{"key": c.key, "dtype": str(c.dtype).removeprefix("torch."),
                                          "shape": list(c.shape), "nbytes": c.nbytes, "version": c.version}
                                         for c in chunks],
                              "bad": bad}, indent=1))
        else:
            used = sum(c.nbytes for c in chunks)
            print(f"store {', '.join(store.paths)}: {len(chunks)} chunks, {format_bytes(used)} used, "
                  f"{format_bytes(store.free_bytes)} free of {format_bytes(store.capacity_bytes)}, "
                  f"{'O_DIRECT' if store.direct else 'buffered I/O'}")
            for c in chunks:
                print(f"  {c.key:40s} {str(c.dtype).removeprefix('torch.'):>9s} {str(list(c.shape)):>20s} "
                      f"{format_bytes(c.nbytes):>10s}")
            if args.action == "verify":
                print("verified: all checksums match" if not bad else f"{len(bad)} bad chunks:")
                for key, err in bad.items():
                    print(f"  {key}: {err}")
    return 1 if bad else 0


def _parse_bytes(text: str) -> int:
    """``24GiB``, ``2TB``, ``512MB``, ``1048576`` -> bytes: :func:`offload.config.parse_bytes`, as argparse wants
    its errors."""
    from offload.config import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_probe(args: argparse.Namespace) -> int:
    """Measure this machine (FLOP/s, copies, disk, CPU update) and cache the profile, unless --no-save."""
    from scheduler.probe import probe, summary
    from scheduler.profile import cached_path

    if args.rounds is not None and args.rounds < 1:
        print(f"offload probe: expected --rounds >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    if args.dir is not None:  # made here, as --measure's store directory is, before minutes of measuring
        try:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"offload probe: --dir {args.dir!r}: expected a directory on the disk to measure, and it cannot be "
                  f"created ({e.strerror or e}); pass an existing directory on that disk", file=sys.stderr)
            return 2
    prof = probe(quick=args.quick, directory=args.dir, rounds=args.rounds)
    path = None if args.no_save else prof.save(cached_path(args.dir))
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1))
    else:
        print(summary(prof))
    # Where it went, and what that means, on stderr with --json too: later plans use it without being told.
    if path is None:
        print("not saved (--no-save): `offload plan` keeps its current default profile", file=sys.stderr)
    else:
        print(f"saved to {path}: the default profile of every later `offload plan` on this machine (one without "
              f"--profile); delete the file, or re-run `offload probe`, to replace it", file=sys.stderr)
    if prof.warnings:
        print(f"offload probe: {len(prof.warnings)} warning(s): these numbers may not be this machine's; re-run "
              f"`offload probe` when the machine is otherwise idle" + ("" if path is None else
                                                                      ", or delete the file above") + ":",
              file=sys.stderr)
        for w in prof.warnings:
            print(f"  - {w}", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """Dry run: plan placement for a model on a profile and predict one iteration, without allocating it."""
    from scheduler import planner, profile, report, workload

    if args.nproc < 1:
        print(f"offload plan: --nproc: expected a number of ranks >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    try:
        w = workload.load(args.model, batch=args.batch, seq=args.seq)
        hw = profile.resolve(args.profile).with_capacities(
            device_memory_bytes=args.device_memory, host_memory_bytes=args.host_memory, nvme_bytes=args.nvme,
            device_reserve_bytes=args.device_reserve, host_reserve_bytes=args.host_reserve)
    except ValueError as e:
        print(f"offload plan: {e}", file=sys.stderr)
        return 2
    for doubt in hw.doubts():  # a suspect profile is said every time it is used, not only when it was measured
        print(f"offload plan: warning: profile {hw.name}"
              f"{' (' + str(profile.cached_path()) + ', the default)' if args.profile is None else ''}: {doubt}",
              file=sys.stderr)
    if args.nproc > 1:
        return _plan_sharded(args, w, hw)
    if args.measure:
        return _plan_measure(args, hw)
    res = planner.plan(w, hw)
    rows = report.compare(w, hw, res)
    clip = _clip_prices(w, hw, res) if args.clip and res.fits else None
    if args.json:
        print(json.dumps({**report.to_dict(w, hw, res, rows), **({"clipping": clip} if clip else {})}, indent=1))
    else:
        print(report.text(w, hw, res, rows))
        if clip:
            print(_clip_text(clip))
    if args.out:
        for f in report.write(args.out, w, hw, res, rows):
            print(f"wrote {f}", file=sys.stderr)
    return 0 if res.fits else 1


_NOT_MEASURABLE = ("offload plan --measure: expected a preset or a module:function returning "
                   "scheduler.workload.build_transformer(...) (a model with a .shape), got {model!r}; --measure "
                   "trains the model for real on random tokens")


def _model_shape(model: str):
    """The TransformerShape of a preset or of a ``module:function`` returning our TransformerLM (``None`` for
    anything else): what ``--measure`` can build and train."""
    import importlib

    import torch

    from scheduler import workload

    if model in workload.PRESETS:
        return workload.PRESETS[model][0]
    try:
        mod_name, _, fn_name = model.partition(":")
        with torch.device("meta"):
            shape = getattr(getattr(importlib.import_module(mod_name), fn_name)(), "shape", None)
    except (ImportError, AttributeError, ValueError):
        shape = None
    return shape if isinstance(shape, workload.TransformerShape) else None


def _measured_workload(args: argparse.Namespace):
    """``(shape, workload)`` of what ``--measure`` trains (fp32, our TransformerLM), or ``None`` after saying in
    one line why it cannot (a model it cannot build, ``--iters`` below 1)."""
    from offload.measure import workload_of

    shape = _model_shape(args.model)
    if shape is None:
        print(_NOT_MEASURABLE.format(model=args.model), file=sys.stderr)
        return None
    if args.iters < 1:
        print(f"offload plan --measure: expected --iters >= 1, got {args.iters}", file=sys.stderr)
        return None
    return shape, workload_of(shape, batch=args.batch, seq=args.seq, name=args.model)


def _rank_threads() -> int:
    """Threads each rank of ``offload run --nproc N`` computes on: torchrun gives each of several processes
    ``OMP_NUM_THREADS``, 1 unless it is set."""
    import os

    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _plan_sharded(args: argparse.Namespace, w, hw) -> int:
    """``offload plan --nproc N``: a ShardedOffloadOptimizer run on N ranks of this profile's machine, per rank
    (scheduler/sharded.py); with ``--measure``, the real run on N gloo ranks here beside it."""
    from scheduler import sharded
    from scheduler.workload import PRESETS, build_transformer

    if args.out:
        print("offload plan: --out writes offload.wrap's plan (one process); with --nproc > 1 use --json",
              file=sys.stderr)
        return 2
    shape = _model_shape(args.model)
    # The exact bucket layout needs the params in their order: a preset's from our model of its shape, built on
    # meta; other models' from their units (per-param padding uncounted, as the report says).
    numels = [p.numel() for p in build_transformer(shape).parameters()] if args.model in PRESETS else None
    if args.measure:
        return _plan_sharded_measure(args, hw, shape)
    best, preds = sharded.plan(w, hw, args.nproc, numels=numels, clip=args.clip, threads_per_rank=_rank_threads())
    if args.json:
        print(json.dumps({"nproc": args.nproc, "workload": w.to_dict() | {"units": len(w.units)},
                          "profile": hw.name, "plan": best.to_dict(), "tiers": [p.to_dict() for p in preds]},
                         indent=1))
    else:
        print(sharded.text(w, hw, best, preds))
    return 0 if best.fits else 1


def _plan_sharded_measure(args: argparse.Namespace, hw, shape) -> int:
    """``offload plan --nproc N --measure``: the planned state tier run on N gloo ranks (fp32, this machine's CPU)
    for a few iterations; per rank, predicted vs measured memory per tier and iteration time, and the
    collectives' bytes predicted vs counted."""
    import shutil

    from offload import measure_sharded
    from offload.measure import temp_store_dir
    from scheduler import sharded
    from scheduler.workload import build_transformer

    measured = _measured_workload(args)
    if measured is None:
        return 2
    shape, w = measured
    numels = [p.numel() for p in build_transformer(shape).parameters() if p.requires_grad]
    threads = _rank_threads()
    best, _ = sharded.plan(w, hw, args.nproc, numels=numels, clip=args.clip, threads_per_rank=threads)
    d = temp_store_dir(args.dir)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    log(f"measuring {args.model} ({w.params / 1e6:.1f}M params, fp32, batch {args.batch} x seq {args.seq} per rank) "
        f"on {args.nproc} gloo ranks: state on {best.state_tier} (predicted {best.iteration_s:.3f} s), 1 warm-up + "
        f"{args.iters} iterations")
    config = {"state_tier": best.state_tier, "nvme_dirs": d, "update_on": best.update_on,
              **({"max_grad_norm": 1e6} if args.clip else {})}
    try:
        ranks = measure_sharded.run(shape, world=args.nproc, batch=args.batch, seq=args.seq, config=config,
                                    iters=args.iters, threads=threads)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    cmp = measure_sharded.compare(best, ranks)
    if args.json:
        print(json.dumps(cmp, indent=1))
    else:
        print(measure_sharded.text(cmp))
    return 0


def _clip_prices(w, hw, res) -> dict:
    """``offload plan --clip``: the plan's iteration when its steps clip, both ways the policy can go."""
    from scheduler.cost import CostModel
    from scheduler.speculation import price

    cm = CostModel(w, hw)
    return {"never_clips": price(cm, res.plan, 0.0).as_dict(), "always_clips": price(cm, res.plan, 1.0).as_dict()}


def _measure_clip(args, shape, w, hw, plan, d: str, log) -> list[dict]:
    """``offload plan --measure --clip``: the plan run with a max_grad_norm no step reaches and with one every step
    exceeds, each against its price, with speculation on where the price says it pays on steps that do not clip
    (OffloadConfig.speculate; else every step waits for backward, as the printed advice says). Steps that clip:
    a speculating run rolls its first step back, then the policy waits for backward. Each row runs in a process
    of its own (:func:`_in_own_process`)."""
    from offload.config import OffloadConfig
    from scheduler.cost import CostModel
    from scheduler.speculation import price

    cm = CostModel(w, hw)
    speculate = price(cm, plan, 0.0).speculates
    rows = []
    for steps, norm, p in (("steps that do not clip", 1e6, 0.0), ("steps that clip", 1e-6, 1.0)):
        cost = price(cm, plan, p)
        predicted, how = ((cost.commit_s, "speculative, committed") if speculate and p == 0.0 else
                          (cost.wait_s, "waiting for backward" + ("" if speculate else " (speculate=False: "
                                                                                        "waiting costs less here)")))
        # Four warm-ups: the first step creates the optimizer state, the second is the first whose pre-update
        # copies exist (their host buffers are touched then: a 124M in-memory plan here, 3.5 s against 1.2), and
        # steps that wait for backward settle after two more (the in-memory 124M plan: 1.00, 0.87, then 0.59 s).
        # The policy's timing rule is off: each row measures its own kind of step, as it is priced.
        log(f"measuring with clipping, {steps} (max_grad_norm={norm:g}, speculate={speculate}; predicted "
            f"{predicted:.2f} s): 4 warm-ups + {args.iters} iterations, in a process of its own")
        config = OffloadConfig(nvme_dirs=d, max_grad_norm=norm, speculate=speculate)
        c = _in_own_process(_clip_row, shape, config, hw.to_dict(), plan, bool(args.json),
                            dict(batch=args.batch, seq=args.seq, iters=args.iters, warmup=4, name=args.model))
        rows.append({"steps": steps, "max_grad_norm": norm, "speculate": speculate, "how": how,
                     "predicted_s": predicted, "measured_s": c["measured_s"], "ratio": predicted / c["measured_s"],
                     "set_aside": c["set_aside"], "disturbed": c["disturbed"]})
    return rows


def _in_own_process(fn, *args):
    """``fn(*args)`` in a fresh (spawned) Python process; its result. A measurement run after another in one
    process found the memory the first one freed handed back to this VM's host (free page reporting) and paid a
    page fault for each of its pages again: the steps that wait for backward of an NVMe plan grew 1.15 -> 1.58 s
    within such a run, against a steady 1.19-1.21 s in a process of their own."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def _clip_row(shape, config, hw: dict, plan, to_stderr: bool, kw: dict) -> dict:
    """One row of ``offload plan --measure --clip``: :func:`offload.measure.measure` of ``plan`` under ``config``
    (clipping), its policy not timing steps; what the row reports of it."""
    from offload.measure import measure
    from scheduler.profile import HardwareProfile

    def log(m: str) -> None:
        print(m, file=sys.stderr if to_stderr else sys.stdout, flush=True)

    c = measure(shape, config, HardwareProfile.from_dict(hw), plan=plan, progress=log, prepare=_untimed_speculation,
                **kw)
    return {"measured_s": c.measured_s, "set_aside": c.set_aside, "disturbed": c.disturbed}


def _untimed_speculation(run) -> None:
    from offload.optimizer import SpeculationPolicy

    run.opt.speculation = SpeculationPolicy(timed=False)


def _clip_text(clip: dict) -> str:
    from storage import format_bytes

    never, always = clip["never_clips"], clip["always_clips"]
    return (f"with clipping (max_grad_norm, or a loop that clips): the update speculates during backward and the "
            f"step is validated after it\n"
            f"  steps that do not clip: {never['commit_s']:.2f} s (speculative, committed; waiting for backward "
            f"would take {never['wait_s']:.2f} s)\n"
            f"  steps that clip: {always['expected_s']:.2f} s (the policy stops speculating and waits; a "
            f"speculative step that clips costs {always['rollback_s']:.2f} s: undone, then redone)\n"
            f"  pre-update copies while speculating: {format_bytes(never['pre_image_bytes'])} of host memory" + (
                "\n  here waiting costs less than a speculative step that commits (its copies share the cores with "
                "backward): OffloadConfig(speculate=False)" if never["commit_s"] > never["wait_s"] else ""))


def _plan_measure(args: argparse.Namespace, hw) -> int:
    """``offload plan --measure``: the planner's plan, run for a few iterations (fp32, on this machine's CPU),
    predicted vs measured per resource and in total. Where it cannot run (nothing fits the profile, or the runtime
    refuses a placement), the fastest uniform placement instead, said in one line."""
    import shutil

    from offload.config import OffloadConfig
    from offload.measure import measure, runnable_plan, temp_store_dir
    from scheduler import planner

    measured = _measured_workload(args)
    if measured is None:
        return 2
    shape, w = measured
    res = planner.plan(w, hw)
    d = temp_store_dir(args.dir)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    what = (f"{args.model} ({w.params / 1e6:.1f}M params, fp32, batch {args.batch} x seq {args.seq}) on profile "
            f"{hw.name}")

    def run(plan, pred, which):
        log(f"measuring {what}: {which}, {plan.compact()}, prefetch {plan.prefetch_depth} (predicted "
            f"{pred.iteration_s:.2f} s), 1 warm-up + {args.iters} iterations; NVMe store in {d}")
        return measure(shape, OffloadConfig(nvme_dirs=d), hw, batch=args.batch, seq=args.seq, iters=args.iters,
                       name=args.model, plan=plan, progress=log)

    note, plan = None, res.plan
    try:
        if res.fits:
            try:
                c = run(plan, res.prediction, "the fastest placement offload.wrap runs (the planner's plan)")
            except (NotImplementedError, ValueError) as e:  # a placement this runtime refuses: said, not hidden
                note = f"the planner's plan {plan.compact()} cannot run here ({e})"
        else:
            note = f"the planner's plan does not fit the profile ({res.shortfall})"
        if note is not None:
            plan, pred = runnable_plan(w, hw)
            log(f"note: {note}; measuring the fastest uniform placement instead")
            c = run(plan, pred, "the fastest uniform placement offload.wrap runs")
        clip_rows = _measure_clip(args, shape, w, hw, plan, d, log) if args.clip else []
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if args.json:
        print(json.dumps({**c.to_dict(), "measured_plan": "runnable" if note else "planner", "note": note,
                          **({"clipping": clip_rows} if args.clip else {})}, indent=1))
        return 0
    print(c.text())
    for r in clip_rows:
        print(f"  with clipping, {r['steps']}: predicted {r['predicted_s']:.2f} s, measured {r['measured_s']:.2f} s "
              f"(predicted / measured {r['ratio']:.2f}; {r['how']}"
              + (f"; {r['set_aside']} disturbed iterations set aside" if r["set_aside"] else "")
              + ("; every iteration was disturbed" if r["disturbed"] else "") + ")")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from offload import __version__

    parser = argparse.ArgumentParser(
        prog="offload", description="Train models whose weights, gradients and optimizer state do not fit on the "
                                    "GPU: plan where they go, measure this machine, inspect a store.",
        epilog="Run 'offload VERB --help' for a verb's options and examples.")
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    from offload import demo

    p = sub.add_parser("demo", help="fine-tune a built-in small GPT with params, grads and state offloaded",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.build_parser(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("run", help="run a training script with the runtime configured from a file",
                       description="Validate a config (TOML; unknown keys and bad values are refused), then run "
                                   "SCRIPT with it: offload.wrap and OffloadOptimizer pick it up when given no "
                                   "config. Prints the placement before training and the run report after.",
                       epilog="examples:\n  offload run examples/finetune_gpt.py --steps 50\n"
                              "  offload run --config examples/offload.toml --set state_tier=host train.py --lr 1e-4\n"
                              "  offload run --nproc 2 --config offload.toml train.py",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file of OffloadConfig keys, with a [store] table (examples/offload.toml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key, e.g. --set state_tier=nvme --set store.block_bytes=4MiB (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="processes, started through torch.distributed (torchrun); "
                                                        "each rank gets its own store directory")
    p.add_argument("--report", help="directory for the run report (default offload-runs/<script name>)")
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("store", help="list or verify the chunks of an NVMe store",
                       description="List the chunks of an NVMe store, or read them all back and check their "
                                   "checksums.", epilog="examples:\n  offload store list /mnt/nvme/offload\n"
                                                        "  offload store verify /mnt/nvme0/s /mnt/nvme1/s --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "verify"])
    p.add_argument("paths", nargs="+", help="the store's directories, in the order that created it")
    p.add_argument("--json", action="store_true", help="print JSON for tools instead of text")
    p.set_defaults(func=_cmd_store)
    p = sub.add_parser("probe", help="measure this machine into a hardware profile",
                       description="Measure device FLOP/s per dtype, host<->device copies, disk read/write/mixed "
                                   "through the NVMe store, and CPU optimizer throughput alone and under disk "
                                   "traffic, each in several interleaved rounds (median and spread reported); check "
                                   "related rates against each other and warn when they are implausible (run it on "
                                   "an otherwise idle machine). The result is cached under "
                                   "~/.cache/offload/profiles/<fingerprint>.json (OFFLOAD_CACHE_DIR) and becomes the "
                                   "default profile of `offload plan` on this machine; --no-save prints it only.",
                       epilog="examples:\n  offload probe\n  offload probe --dir /mnt/nvme --json\n"
                              "  offload probe --no-save --rounds 9\n  offload probe --quick",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="directory on the disk to measure (default: the temp dir)")
    p.add_argument("--quick", action="store_true", help="a few seconds, rough numbers (for tests)")
    p.add_argument("--rounds", type=int, default=None,
                   help="times each noisy rate is measured, interleaved with the related ones (default 5, --quick "
                        "2); the median is kept and the spread reported")
    p.add_argument("--no-save", action="store_true",
                   help="print the profile, do not cache it (the cached one becomes every later plan's default)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=_cmd_probe)
    p = sub.add_parser("plan", help="dry run: placement, memory, predicted iteration time",
                       description="Plan where each unit's params, grads and optimizer state live and where it is "
                                   "updated, predict one iteration, and compare with other systems' strategies. "
                                   "Allocates nothing.",
                       epilog="examples:\n  offload plan llama-70b --batch 4 --seq 2048 --profile "
                              "rtx4090-pcie4-gen4nvme --device-memory 24GiB --host-memory 128GiB --nvme 2TB\n"
                              "  offload plan gpt2 --batch 8 --seq 1024 --out plan/\n"
                              "  offload plan mypkg.models:build --batch 1 --seq 4096 --json\n"
                              "  offload plan ./Llama-2-7b-hf --batch 1 --seq 4096   # a HF checkpoint directory\n"
                              "  offload plan gpt2 --batch 2 --seq 256 --measure   # predicted vs measured here\n"
                              "  offload plan gpt2 --batch 1 --seq 256 --nproc 2   # ShardedOffloadOptimizer, per rank\n"
                              "models: a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-7b, llama-13b, "
                              "llama-70b, gpt3-175b), module:function, or a HF checkpoint directory (its config.json "
                              "gives the sizes and the dtype planned; nothing is allocated)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="preset name, package.module:function, or a HF checkpoint directory (or the path "
                                 "of its config.json)")
    p.add_argument("--batch", type=int, default=1, help="sequences per iteration (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--profile", help="shipped profile name or JSON path (default: this machine's cached probe, "
                                     "else cpu-dev-2core)")
    p.add_argument("--device-memory", type=_parse_bytes, help="override device capacity, e.g. 24GiB")
    p.add_argument("--host-memory", type=_parse_bytes, help="override host capacity, e.g. 128GiB")
    p.add_argument("--nvme", type=_parse_bytes, help="override NVMe capacity, e.g. 2TB")
    p.add_argument("--device-reserve", type=_parse_bytes,
                   help="device memory no plan may use (CUDA context, fragmentation), e.g. 2GiB; default: the "
                        "profile's, kept when --device-memory is given")
    p.add_argument("--host-reserve", type=_parse_bytes,
                   help="host memory no plan may use (OS, this process, data loader), e.g. 16GiB; default: the "
                        "profile's, kept when --host-memory is given")
    p.add_argument("--out", help="directory for plan.json, trace.json (Chrome trace) and timeline.svg")
    p.add_argument("--json", action="store_true", help="print JSON for tools instead of text")
    p.add_argument("--measure", action="store_true",
                   help="run the planner's plan for a few real iterations here (fp32, CPU) and print predicted vs "
                        "measured per resource and in total (presets and module:function)")
    p.add_argument("--clip", action="store_true",
                   help="the run clips the grad norm (max_grad_norm, or a loop that clips, as the HF Trainer does): "
                        "also price its steps when they clip and when they do not (with --measure: measure both)")
    p.add_argument("--iters", type=int, default=3, help="with --measure: iterations after one warm-up (default 3)")
    p.add_argument("--dir", help="with --measure: where the NVMe store goes (default: a temp dir)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks on this machine (`offload run --nproc N`): plan a ShardedOffloadOptimizer run per "
                        "rank, --batch being each rank's (default 1: offload.wrap in one process); with --measure, "
                        "run it on N gloo ranks here")
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
