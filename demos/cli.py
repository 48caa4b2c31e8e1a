"""The `poslens` console script: every analysis subcommand, plus `demo`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from analyses import cli
from demos.panels import DEFAULT_MODEL_DIR, default_model, discover_models
from demos.static import check_static_path, write_static_page


def _demo(args: argparse.Namespace) -> None:
    if args.static:
        check_static_path(args.static, overwrite=args.overwrite)
    else:
        try:  # dash is the optional `demo` extra: only the server needs it
            from demos.app import check_port, serve
        except ImportError as error:
            raise ValueError(f"the demo server needs dash: pip install -e '.[demo]' ({error})") from error
        check_port(args.port)
    models = discover_models(args.models or default_model(device=args.device, quiet=args.quiet))
    if args.static:
        path = write_static_page(models, args.static, overwrite=args.overwrite, device=args.device, quiet=args.quiet)
        print(f"wrote {path}")
    else:
        serve(models, port=args.port, device=args.device, quiet=args.quiet)


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    """`poslens demo`: the interactive activation-patching app on 127.0.0.1, or its static page."""
    p = commands.add_parser("demo", help="interactive activation-patching app (local web page), or --static OUT.html")
    p.add_argument("--models", help="a reproduce output folder or a checkpoint folder (default: train or load "
                                    f"the built-in model in {DEFAULT_MODEL_DIR})")
    p.add_argument("--port", type=int, default=8050, help="port on 127.0.0.1 (default 8050; 0 = any free port)")
    p.add_argument("--static", metavar="OUT.html", help="write one self-contained HTML page instead of serving")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --static file")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars or request log")
    p.set_defaults(run=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, parser=cli.build_parser(extra_commands=[add_demo_command]))


if __name__ == "__main__":
    raise SystemExit(main())
