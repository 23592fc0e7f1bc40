"""The command of a kernel pod: write the connection file from the pod's environment, run ipykernel.

The key comes from the kernel's Secret (``MLOPS_KERNEL_KEY``), the server reaches the pod's own IP
(``MLOPS_POD_IP``, from the downward API) and the ports are fixed (``MLOPS_KERNEL_PORTS``): the
server knows the whole connection before the pod exists, so nothing has to call back to it and no
port can be taken by someone else in between. Imports nothing but the standard library.

The kernel binds every address of the pod (``0.0.0.0``): its IP for a server in the cluster, and
localhost, which is where a port-forward arrives (the container runtime dials localhost inside the
pod's network namespace). ``MLOPS_KERNEL_BIND`` names one address instead, for pods without a
network namespace of their own (the tests' kubelet stand-in runs pods as local processes).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def connection_info(environ: dict[str, str]) -> dict[str, object]:
    ports = json.loads(environ["MLOPS_KERNEL_PORTS"])
    info: dict[str, object] = {"ip": environ.get("MLOPS_KERNEL_BIND") or "0.0.0.0", "transport": "tcp",
                               "key": environ["MLOPS_KERNEL_KEY"],
                               "signature_scheme": "hmac-sha256", "kernel_name": ""}
    info.update({f"{channel}_port": int(port) for channel, port in ports.items()})
    return info


def main() -> None:
    try:
        info = connection_info(dict(os.environ))
    except (KeyError, ValueError) as e:
        sys.exit(f"jupyter_mlops kernel pod: its environment lacks {e} (MLOPS_KERNEL_KEY and "
                 "MLOPS_KERNEL_PORTS come from the pod spec the server writes)")
    fd, path = tempfile.mkstemp(prefix="mlops-kernel-", suffix=".json")  # 0600: the key is a secret
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", path])


if __name__ == "__main__":
    main()
