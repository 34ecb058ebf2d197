"""``dynamicrafter app`` (also ``dynamicrafter-app``, ``scripts/gradio/app.py``): serve the browser demo of one model.

Its flags are checked, and the model's config read, before gradio or torch are imported, so a
mistake answers at once; then the model is loaded and the page (:mod:`dynamicrafter.page`) is
served on 127.0.0.1 until Ctrl-C. Everything is served locally: no share link unless ``--share``
asks for one, no telemetry, no version check. The log has the format of every command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from . import frontend
from .configs import model_config
from .errors import UserError
from .options import add_model_arguments, number_arg

__all__ = ["KEEP_MINUTES", "MB", "main"]

logger = logging.getLogger(__name__)

MB = 1024 * 1024
#: Uploads and videos are deleted this many minutes after they were made.
KEEP_MINUTES = 60


def _parser() -> argparse.ArgumentParser:
    """Command-line options of ``dynamicrafter app`` (the model options are the command line's)."""
    parser = frontend.Parser(prog="dynamicrafter app", description=__doc__.splitlines()[0].split(": ", 1)[1])
    frontend.add_model_choice(parser, "256")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=number_arg(True, 1, 65535), default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--max-upload-mb", type=number_arg(False, 0.01, 10_000), default=20,
                        help="largest upload in MB (default 20)")
    parser.add_argument("--queue-size", type=number_arg(True, 1, 10_000), default=8,
                        help="most waiting requests (default 8)")
    parser.add_argument("--keep-minutes", type=number_arg(False, 1, 7 * 24 * 60), default=KEEP_MINUTES,
                        help=f"delete uploads and videos this many minutes after they were made (default {KEEP_MINUTES})")
    parser.add_argument("--control", type=Path, action="append", metavar="FILE",
                        help="a ControlNet (SD 2.1) or ToonCrafter's sketch_encoder.ckpt: the page then takes control "
                             "images (sketches per key frame or a line-art video); repeat for several")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Load one model and serve the page until interrupted; returns the exit status."""
    frontend.configure_logging()
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version check from gradio
    return frontend.run_command(lambda: _serve(argv))


def _serve(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    resolution = frontend.chosen_model(args, "256")
    try:
        model_config(resolution, args.config)  # a bad config is refused before anything heavy is imported
        pipeline = frontend.build_pipeline(args, resolution, args.device)
        for path in args.control or []:
            pipeline.load_controlnet(path)
    except UserError as exc:  # bad config, LoRA, missing or undownloadable checkpoint: a start-up usage error
        raise frontend.CliError(str(exc), frontend.EXIT_USAGE) from None
    from .page import build_demo

    demo = build_demo(pipeline, max_upload_mb=args.max_upload_mb, keep_minutes=args.keep_minutes)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True,
                max_file_size=int(args.max_upload_mb * MB), show_error=False, ssr_mode=False)
    if demo.share_url:
        logger.info("Serving on %s and %s (public); Ctrl-C stops it.", demo.local_url, demo.share_url)
    else:
        logger.info("Serving on %s; Ctrl-C stops it. For a public link, start the app with --share.", demo.local_url)
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.info("Stopping the server.")
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # gradio prints "Closing server running on port: ..."
            demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
