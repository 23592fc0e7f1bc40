"""``jupyter mlops gpus`` and ``jupyter mlops kernelspecs``: thin faces over jupyter_mlops.kernels."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_kernel_commands"]


def add_kernel_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("gpus", help="this machine's GPUs, who holds which, and who waits")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_gpus)

    p = sub.add_parser("kernelspecs", help="write the kernel specs of installed environments x profiles "
                       "(env create/remove and the server do it too)")
    p.set_defaults(func=_cmd_kernelspecs)


def _settings() -> Any:
    from .config import load_config
    from .kernels.launch import LocalKernels

    return LocalKernels(config=load_config().config)


def _cmd_gpus(args: argparse.Namespace) -> int:
    from .kernels.provisioner import gpu_allocator

    allocator = gpu_allocator(_settings())
    devices = allocator.inventory.devices()
    holders = {h["device"]: h for h in allocator.holders()}
    waiting = allocator.waiting()
    if args.json:
        print(json.dumps({"devices": [d.to_dict() for d in devices], "holders": list(holders.values()),
                          "waiting": waiting, "reason": allocator.inventory.reason}, indent=2))
        return 0
    if not devices:
        print(f"no GPUs ({allocator.inventory.reason or 'none in the inventory'})")
        return 0
    for device in devices:
        holder = holders.get(device.index)
        held = f"held by {holder.get('user')} (kernel {holder.get('kernel_id')}, since {holder.get('since')})" \
            if holder else "free"
        print(f"GPU {device.index}  {device.name:<28} {device.uuid}  {held}")
    for position, entry in enumerate(waiting, 1):
        print(f"waiting {position}: {entry.get('user')} for {entry.get('count')} GPU(s) since {entry.get('since')}")
    return 0


def _cmd_kernelspecs(args: argparse.Namespace) -> int:
    from .kernels.kernelspecs import default_kernels_dir, sync_from_config

    done = sync_from_config()
    print(f"kernel specs in {default_kernels_dir()}: written {', '.join(done.written) or 'none'}; "
          f"removed {', '.join(done.removed) or 'none'}")
    return 0
