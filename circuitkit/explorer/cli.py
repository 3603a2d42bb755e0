"""``circuitkit serve MODEL [--decoder DEC] [--case DIR] [--host H] [--port N]``."""
from __future__ import annotations

import argparse
import sys

from circuitkit.cli import Output, add_common
from circuitkit.errors import CircuitkitError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_common(sub.add_parser("serve", help="the live InversionView explorer in the browser (loopback)"))
    p.add_argument("model", help="probed model checkpoint directory")
    p.add_argument("--decoder", help="its InversionView decoder (default: exact pool preimages, no decoder)")
    p.add_argument("--case", help="a case run's findings: a case name (runs/CASE/circuit if present, else "
                                  "reports/CASE), a report directory, or a run's circuit stage (which holds the CIs)")
    p.add_argument("--task", help="task (default: read from the checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; "
                                                       "any other needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on a non-loopback --host; every request then needs the printed launch token")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument("--pool", type=int, default=20000, help="pool inputs for exact preimages without a decoder")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> Output:
    import torch

    from circuitkit.explorer.access import is_loopback
    from circuitkit.explorer.server import ExplorerServer
    from circuitkit.explorer.session import Explorer
    from circuitkit.models.checkpoint import load_probed
    from circuitkit.validate import check_device, check_range, check_threads

    check_range("--port", args.port, 0, 65535)
    if not is_loopback(args.host) and not args.allow_remote:
        raise CircuitkitError(f"--host {args.host} is reachable from other machines; pass --allow-remote as well "
                              "(every request then needs the launch token printed in the URL), or keep the default "
                              "127.0.0.1")
    check_range("--pool", args.pool, 10, 1_000_000)
    check_threads(args.threads)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder, decoder_meta = None, None
    if args.decoder:
        from circuitkit.inversion.checkpoint import check_decoder_dir, read_decoder_meta

        check_decoder_dir(args.decoder)
        decoder_meta = read_decoder_meta(args.decoder)
    pm = load_probed(args.model, task=args.task, device=args.device,
                     artefact=(decoder_meta, str(args.decoder)) if decoder_meta is not None else None)
    if args.decoder:
        from circuitkit.inversion.checkpoint import load_decoder

        decoder = load_decoder(args.decoder, pm, device=args.device)
    explorer = Explorer(pm, decoder, args.case, pool_size=args.pool)
    try:
        server = ExplorerServer(explorer, args.host, args.port, quiet=not args.verbose)
    except OSError as e:
        raise CircuitkitError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                              "(0 = any free port)") from None
    print(f"circuitkit explorer for {pm.task.name} on {server.url}  (Ctrl-C stops it)", flush=True)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: other machines can reach the explorer; it answers only "
              "requests that carry the launch token in the URL above, which anyone who sees it can use",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return Output({"url": server.url, "stopped": True}, "explorer stopped")
