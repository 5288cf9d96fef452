"""The ``offload`` command. Each verb is a function ``_cmd_<verb>(args)`` with its own parser and examples."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_store(args: argparse.Namespace) -> int:
    """Inspect or verify an NVMe store directory."""
    from storage import NvmeStore, StoreError, format_bytes

    try:
        store = NvmeStore(args.paths, create=False)
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


def build_parser() -> argparse.ArgumentParser:
    from offload import __version__

    parser = argparse.ArgumentParser(prog="offload", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    p = sub.add_parser("store", help="list or verify the chunks of an NVMe store",
                       description="List the chunks of an NVMe store, or read them all back and check their "
                                   "checksums.", epilog="examples:\n  offload store list /mnt/nvme/offload\n"
                                                        "  offload store verify /mnt/nvme0/s /mnt/nvme1/s --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "verify"])
    p.add_argument("paths", nargs="+", help="the store's directories, in the order that created it")
    p.add_argument("--json", action="store_true", help="print JSON for tools instead of text")
    p.set_defaults(func=_cmd_store)
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
