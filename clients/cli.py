"""``neuronserve-client``: command-line client for a neuronserve server.

    neuronserve-client complete "Once upon a time" --max-tokens 32 --sparsity 0.5
    neuronserve-client chat "Hi" --system "Be brief." --stream \\
        --intervention '{"type": "steer", "sae": "l9-resid-8k", "feature": 1234, "strength": 6.0}'
    neuronserve-client models | health [--wait 120] | tokenize TEXT | interventions | version

Connection: ``--base-url`` / ``$NEURONSERVE_BASE_URL``, ``--api-key`` / ``$NEURONSERVE_API_KEY``.
Exit status: 0 ok, 1 error from the server or the connection (message on stderr) or not
healthy, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence, TextIO

from ._core import __version__
from .client import NeuronServeClient
from .types import NeuronServeError, Usage

ClientFactory = Callable[..., NeuronServeClient]
"""Called with keyword args ``base_url``, ``api_key``, ``model``, ``timeout``."""


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _intervention(text: str) -> dict[str, Any]:
    value = _json_object(text)
    if not isinstance(value.get("type"), str):
        raise argparse.ArgumentTypeError('needs a "type" key, e.g. {"type": "unmemorize", "profile": "canaries"}')
    return value


def _build_parser() -> argparse.ArgumentParser:
    # Options valid both before and after the subcommand. SUPPRESS keeps a subparser from
    # overwriting a value given before the subcommand with its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=argparse.SUPPRESS, help="server URL (env NEURONSERVE_BASE_URL)")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env NEURONSERVE_API_KEY)")
    common.add_argument("--model", default=argparse.SUPPRESS, help="model name (default: the server's first)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="request timeout in seconds")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the raw JSON response")

    gen = argparse.ArgumentParser(add_help=False)
    g = gen.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", metavar="ID")
    g.add_argument("-n", "--n", type=int, help="number of choices")
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--logprobs", type=int)
    g.add_argument("--min-tokens", type=int)
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--logit-bias", type=_json_object, metavar="JSON", help='e.g. \'{"50256": -100}\'')
    g.add_argument("--sparsity", type=float, help="WINA sparsity target, 0 .. 0.9")
    g.add_argument(
        "--intervention",
        dest="interventions",
        type=_intervention,
        action="append",
        metavar="JSON",
        help="intervention object (repeatable), e.g. '{\"type\": \"eigenshift\", \"profile\": \"toxicity\", \"alpha\": 0.3}'",
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("-v", "--verbose", action="store_true", help="report usage, sparsity, interventions on stderr")

    parser = argparse.ArgumentParser(
        prog="neuronserve-client", description="Client for a neuronserve server.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"neuronserve-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("complete", parents=[common, gen], help="text completion")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text ('-' reads stdin)")
    p.add_argument("--echo", action="store_true", default=None, help="include the prompt in the output")
    p = sub.add_parser("chat", parents=[common, gen], help="chat completion")
    p.add_argument("message", metavar="MESSAGE", help="user message ('-' reads stdin)")
    p.add_argument("--system", help="system prompt")
    sub.add_parser("models", parents=[common], help="list models")
    p = sub.add_parser("health", parents=[common], help="server health (exit 1 unless ready)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for the server to be ready")
    p = sub.add_parser("tokenize", parents=[common], help="tokenize text")
    p.add_argument("text", metavar="TEXT", help="text ('-' reads stdin)")
    sub.add_parser("interventions", parents=[common], help="list loaded intervention profiles")
    sub.add_parser("version", parents=[common], help="server version")
    return parser


_GEN_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "min_tokens",
    "ignore_eos", "logit_bias", "sparsity", "interventions", "echo",
)  # fmt: skip


def _text_arg(value: str, stdin: TextIO) -> str:
    return stdin.read() if value == "-" else value


def _dump(data: Any, out: TextIO, *, indent: int | None = 2) -> None:
    out.write(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def _report(
    err: TextIO,
    finish: dict[int, str | None],
    usage: Usage | None,
    sparsity: Any,
    interventions: list[dict[str, Any]] | None,
) -> None:
    parts = [f"finish_reason[{i}]={r}" for i, r in sorted(finish.items())]
    if usage:
        parts.append(f"tokens: prompt={usage.prompt_tokens} completion={usage.completion_tokens}")
    if sparsity:
        parts.append(f"sparsity: target={sparsity.target} achieved={sparsity.achieved}")
    if interventions is not None:
        parts.append(f"interventions: {json.dumps(interventions)}")
    for p in parts:
        err.write(p + "\n")


def _generate(client: NeuronServeClient, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    params = {k: getattr(args, k) for k in _GEN_FIELDS if getattr(args, k, None) is not None}
    if args.command == "chat" and "logprobs" in params:  # chat spells "N alternatives" this way
        params["logprobs"], params["top_logprobs"] = True, params["logprobs"]
    if args.command == "complete":
        payload: Any = _text_arg(args.prompt, stdin)
        call, stream_call = client.complete, client.stream_complete
    else:
        payload = [{"role": "user", "content": _text_arg(args.message, stdin)}]
        if args.system:
            payload.insert(0, {"role": "system", "content": args.system})
        call, stream_call = client.chat, client.stream_chat
    raw_json = getattr(args, "json", False)

    if not args.stream:
        result = call(payload, **params)
        if raw_json:
            _dump(result.raw, out)
        else:
            for c in result.choices:
                if len(result.choices) > 1:
                    out.write(f"--- choice {c.index} ---\n")
                out.write(c.text + "\n")
        if args.verbose:
            finish = {c.index: c.finish_reason for c in result.choices}
            _report(err, finish, result.usage, result.sparsity, result.interventions)
        return 0

    if args.verbose:
        params["stream_options"] = {"include_usage": True}
    finish: dict[int, str | None] = {}
    others: dict[int, list[str]] = {}  # choices other than 0 are printed when the stream ends
    usage: Usage | None = None
    sparsity, interventions = None, None  # on each choice's finishing chunk, not the usage-only last one
    for chunk in stream_call(payload, **params):
        usage = chunk.usage or usage
        sparsity = chunk.sparsity or sparsity
        interventions = chunk.interventions if chunk.interventions is not None else interventions
        if raw_json:
            _dump(chunk.raw, out, indent=None)
        for c in chunk.choices:
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
            if raw_json or not c.text:
                continue
            if c.index == 0:
                out.write(c.text)
                out.flush()
            else:
                others.setdefault(c.index, []).append(c.text)
    if not raw_json:
        out.write("\n")
        for i in sorted(others):
            out.write(f"--- choice {i} ---\n{''.join(others[i])}\n")
    if args.verbose:
        _report(err, finish, usage, sparsity, interventions)
    return 0


def _run(client: NeuronServeClient, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    raw_json = getattr(args, "json", False)
    cmd = args.command
    if cmd in ("complete", "chat"):
        return _generate(client, args, out, err, stdin)
    if cmd == "models":
        models = client.models()
        if raw_json:
            _dump([m.raw for m in models], out)
        else:
            for m in models:
                out.write(m.id + "\n")
        return 0
    if cmd == "health":
        health = client.wait_until_healthy(args.wait) if args.wait is not None else client.health()
        if raw_json:
            _dump({"ready": health.ready, "status": health.status, "detail": health.detail}, out)
        else:
            out.write(("ok" if health.ready else f"not ready ({health.describe()})") + "\n")
        return 0 if health.ready else 1
    if cmd == "tokenize":
        tok = client.tokenize(_text_arg(args.text, stdin))
        if raw_json:
            _dump(tok.raw, out)
        else:
            out.write(" ".join(map(str, tok.tokens)) + "\n")
            err.write(f"{tok.count} tokens\n")
        return 0
    if cmd == "interventions":
        items = client.interventions()
        if items is None:
            err.write("error: this server does not list interventions (GET /v1/interventions: 404)\n")
            return 1
        _dump(items, out)
        return 0
    if cmd == "version":
        _dump(client.version(), out)
        return 0
    raise AssertionError(cmd)  # argparse restricts the choices


def main(
    argv: Sequence[str] | None = None,
    *,
    client_factory: ClientFactory | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Run the CLI; returns the exit status. ``client_factory`` (default
    :class:`NeuronServeClient`) lets tests inject a client with a mock transport."""
    args = _build_parser().parse_args(argv)
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    factory = client_factory or NeuronServeClient
    kwargs: dict[str, Any] = {
        "base_url": getattr(args, "base_url", None),
        "api_key": getattr(args, "api_key", None),
        "model": getattr(args, "model", None),
    }
    if getattr(args, "timeout", None) is not None:
        kwargs["timeout"] = args.timeout
    try:
        with factory(**kwargs) as client:
            return _run(client, args, out, err, inp)
    except NeuronServeError as exc:
        err.write(f"error: {exc}\n")
        return 1
    except TimeoutError as exc:  # health --wait
        err.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
