"""`neuronserve` command line. Every `serve` flag is generated from ServerSettings."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from server.settings import ServerSettings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(annotation):
    """Map a settings field's annotation to an argparse type and choices."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arg_type(args[0])
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if annotation is Path:
        return Path, None
    return annotation, None


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in ServerSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        env = f"NEURONSERVE_{name.upper()}"
        help_text = f"{field.description} [env {env}; default: {default}]"
        kind, choices = _arg_type(field.annotation)
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, type=kind, choices=choices, default=None,
                                help=help_text)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {name: getattr(args, name) for name in ServerSettings.model_fields
             if getattr(args, name, None) is not None}
    return ServerSettings(**given)


def serve(settings: ServerSettings) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.model.loader import ModelLoadError, resolve_model_path

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolve_model_path(settings.model)  # fail before binding a port on an obvious mistake
    except ModelLoadError as exc:
        print(f"neuronserve: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.shutdown_timeout) + 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuronserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="Serve a model over the OpenAI-compatible API.")
    add_settings_arguments(serve_parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            print(f"neuronserve: invalid settings:\n{exc}", file=sys.stderr)
            return 2
        return serve(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
