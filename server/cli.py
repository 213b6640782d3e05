"""`neuronserve`: serve a Llama-family model over an OpenAI-compatible API, or calibrate profiles for it."""

# Every `serve` flag is generated from ServerSettings.

from __future__ import annotations

import argparse
import logging
import socket
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from server import __version__
from server.profiles import model_slug
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
        if isinstance(default, list):
            default = ", ".join(map(str, default)) or "none"
        env = f"NEURONSERVE_{name.upper()}"
        help_text = f"{field.description} [env {env}; default: {default}]".replace("%", "%%")  # argparse formats %
        kind, choices = _arg_type(field.annotation)
        if typing.get_origin(field.annotation) is list:
            item = typing.get_args(field.annotation)[0]
            parser.add_argument(_flag(name), dest=name, type=item, action="append", default=None,
                                help=help_text)
        elif kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, type=kind, choices=choices, default=None,
                                help=help_text)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {name: getattr(args, name) for name in ServerSettings.model_fields
             if getattr(args, name, None) is not None}
    return ServerSettings(**given)


def _settings_problem(exc: ValidationError) -> str:
    """One line per invalid setting, named as its flag: `--port: Input should be ...`."""
    return "; ".join(f"{_flag(str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg']}" for e in exc.errors())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    try:
        # bound before the app exists: uvicorn binds only after the lifespan has started loading the model
        listener = _bind_listener(settings.host, settings.port)
    except OSError as exc:
        print(f"neuronserve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           loop=settings.event_loop, http=settings.http_parser,
                                           timeout_graceful_shutdown=int(settings.shutdown_timeout) + 1))
    state = app.state.server

    def stop() -> None:
        server.should_exit = True

    state.on_load_failure = stop
    host, port = listener.getsockname()[:2]
    logging.getLogger("neuronserve").info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
    if state.load_error is not None:
        print(f"neuronserve: the model failed to load: {state.load_error}", file=sys.stderr)
        return 1
    return 0 if server.started else 3


def _bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), as uvicorn would bind it; raises OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family=family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


def add_calibrate_parsers(commands, interventions: bool = True) -> None:
    """interventions=False leaves out the intervention methods, whose modules import on demand
    (`serve` does not need them)."""
    calibrate = commands.add_parser("calibrate", help="Make a calibration profile for the served model.")
    calibrate.set_defaults(command_parser=calibrate)
    methods = calibrate.add_subparsers(dest="method", required=True)
    wina = methods.add_parser(
        "wina", help="WINA / TEAL sparsity thresholds for a grid of target sparsities.",
        description="Per-layer, per-projection WINA (and TEAL) score thresholds from calibration text "
        "(Alpaca + WikiText-2 validation; never a test split). Writes wina-<criterion>-<allocation>"
        ".safetensors profiles.")
    wina.set_defaults(command_parser=wina)
    wina.add_argument("--model", default="default", help="Model to calibrate (as for serve). [default]")
    wina.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    wina.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="Calibrate in the dtype you serve with (auto: as serve picks).")
    wina.add_argument("--criterion", default="both", choices=["wina", "teal", "wina_official", "both", "all"],
                      help="wina: |x_i| * column norm on all seven projections; teal: |x_i|; wina_official: "
                           "norms on k_proj and gate_proj only, as microsoft/wina's code does; both: wina and "
                           "teal; all: the three. [both]")
    wina.add_argument("--allocation", default="uniform", choices=["uniform", "greedy", "both"],
                      help="uniform: every projection at the target; greedy: TEAL-style allocation "
                      "within each layer by projection output error.")
    wina.add_argument("--sequences", type=_positive_int, default=48, help="Sequences per source (Alpaca, WikiText).")
    wina.add_argument("--sequence-length", type=_positive_int, default=256)
    wina.add_argument("--seed", type=int, default=0)
    wina.add_argument("--data-dir", type=Path, default=None, help="Default: ../shared/data.")
    wina.add_argument("--out", type=Path, default=None,
                      help="Output directory. Default: <cache>/profiles/<model name>/.")
    if interventions:
        _add_intervention_calibrations(methods)


# `neuronserve calibrate <method>` for the intervention profiles: each module exposes
# add_arguments(parser) and run(args) -> exit code.
INTERVENTION_CALIBRATIONS = {
    "sae": ("server.calibration.sae",
            "Train a TopK or BatchTopK sparse autoencoder on the served model's residual stream (SAELens layout)."),
    "vector": ("server.calibration.vector",
               "A difference-in-means steering vector from two sets of texts, or a llama.cpp control vector converted."),
    "eigenshift": ("server.calibration.eigenshift",
                   "EigenShift toxicity components of the output matrix, from RTP prompts and a toxicity scorer."),
    "memorization": ("server.calibration.memorization",
                     "Neuron or weight masks of down_proj that carry memorized text."),
}


def _add_intervention_calibrations(methods) -> None:
    import importlib

    for method, (module, help_text) in INTERVENTION_CALIBRATIONS.items():
        parser = methods.add_parser(method, help=help_text, description=help_text)
        parser.set_defaults(command_parser=parser)
        importlib.import_module(module).add_arguments(parser)


def calibrate(args: argparse.Namespace) -> int:
    """Runs a calibration; a bad model path or setting is one line and exit 2, not a traceback."""
    from server.model.loader import ModelLoadError, resolve_model_path

    try:
        resolve_model_path(args.model)  # before reading any data or loading anything
        return _calibrate(args)
    except ModelLoadError as exc:
        print(f"neuronserve: {exc}", file=sys.stderr)
    except ValidationError as exc:
        print(f"neuronserve: invalid settings: {_settings_problem(exc)}", file=sys.stderr)
    return 2


def _calibrate(args: argparse.Namespace) -> int:
    if args.method in INTERVENTION_CALIBRATIONS:
        import importlib

        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return importlib.import_module(INTERVENTION_CALIBRATIONS[args.method][0]).run(args)
    from server.calibration.wina import (
        WinaCalibrationConfig,
        calibrate_wina,
        write_profiles,
    )
    from server.runtime import load_model

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(model=args.model, device=args.device, dtype=args.dtype,
                              max_model_len=max(args.sequence_length, 16), wina_profile="none")
    config = WinaCalibrationConfig(
        criteria={"both": ("wina", "teal"), "all": ("wina", "teal", "wina_official")}.get(args.criterion,
                                                                                        (args.criterion,)),
        allocations=("uniform", "greedy") if args.allocation == "both" else (args.allocation,),
        sequences_per_source=args.sequences, sequence_length=args.sequence_length, seed=args.seed,
        **({"data_dir": args.data_dir} if args.data_dir else {}))
    missing = [p for p in (config.data_dir / "alpaca", config.data_dir / "wikitext2") if not p.is_dir()]
    if missing:
        print(f"neuronserve: calibration data not found: {', '.join(map(str, missing))} (--data-dir)",
              file=sys.stderr)
        return 2
    loaded = load_model(settings)
    profiles = calibrate_wina(loaded.model, loaded.tokenizer, config)
    out = args.out or settings.cache_dir / "profiles" / model_slug(loaded.name)
    for path in write_profiles(profiles, out, loaded.fingerprint, loaded.name):
        print(f"wrote {path}")
    for name, profile in profiles.items():
        summary = ", ".join(f"s={level}: ppl {q['heldout_ppl']:.2f} (achieved {q['achieved_sparsity']:.3f})"
                            for level, q in profile["quality"].items())
        print(f"{name}: held-out {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuronserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"neuronserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="Serve a model over the OpenAI-compatible API.")
    add_settings_arguments(serve_parser)
    serve_parser.set_defaults(command_parser=serve_parser)
    argv = sys.argv[1:] if argv is None else argv
    add_calibrate_parsers(commands, interventions=bool(argv) and argv[0] == "calibrate")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand that got them, with its own usage line
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            print(f"neuronserve: invalid settings: {_settings_problem(exc)}", file=sys.stderr)
            return 2
        except SettingsError as exc:  # an environment variable that does not parse
            print(f"neuronserve: invalid settings: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
