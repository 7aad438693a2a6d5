"""Command line: `python -m qwen35_mlx.generate --model PATH|REPO --prompt TEXT`.

Streams the response as it is generated, then prints prompt and generation tokens per second and
peak memory. Without `--model` it runs the tiny model shipped in the package
(`qwen35_mlx/assets/tiny`). Errors a user can cause end in one line on stderr and exit code 2,
with nothing printed on stdout before it.

Everything that can be checked without the model is checked first, before the heavy imports
(mlx-lm, transformers): the options (sampling through `qwen35_mlx.sampling`), the prompt (valid
UTF-8; from stdin without its trailing line break, as `--prompt TEXT` would be), the images, and
config.json (`--image` needs a vision-language checkpoint). `--system` needs the chat template,
so `--system` with `--no-chat-template` (or a model without a template) is an error, not a
silent drop. A prompt longer than the model's `max_position_embeddings` gets a warning on stderr.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from importlib import resources
from pathlib import Path
from typing import NoReturn

DEFAULT_PROMPT = "Hello"


class UserError(Exception):
    """A mistake in the command line or its inputs: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_model() -> str:
    """The tiny model shipped inside the package."""
    return str(resources.files("qwen35_mlx").joinpath("assets", "tiny"))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m qwen35_mlx.generate",
        description="Generate text with a Qwen3.5 model (text or vision-language) on MLX.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or Hugging Face repo id (default: the tiny model in the package)",
    )
    p.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="the user message; '-' reads it from stdin (without its trailing line break)",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image for a vision-language model (repeatable)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="FILE",
        help="a video for a vision-language model (repeatable; needs PyAV, the `video` extra)",
    )
    p.add_argument("--system", default=None, help="a system message (needs the chat template)")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="cast the floating weights on load (default: as stored; float32 is the fast choice "
        "on a CPU)",
    )
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="use the prompt as is, without the model's chat template",
    )
    thinking = p.add_mutually_exclusive_group()
    thinking.add_argument(
        "--enable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=True,
        default=None,
        help="chat template: let the model think first (enable_thinking=True)",
    )
    thinking.add_argument(
        "--disable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=False,
        help="chat template: answer without thinking (enable_thinking=False)",
    )
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=2048,
        help="prompt tokens per prefill step (bounds peak memory)",
    )
    mtp = p.add_mutually_exclusive_group()
    mtp.add_argument(
        "--mtp",
        action="store_true",
        help="speculative decoding with the checkpoint's multi-token-prediction head (default: "
        "on where it was measured to pay, greedy decoding on the CPU with the native extension "
        "built; see README)",
    )
    mtp.add_argument("--no-mtp", action="store_true", help="no MTP speculative decoding")
    p.add_argument(
        "--mtp-k",
        type=int,
        default=None,
        help="tokens the MTP head drafts per step (default 1; implies --mtp); ignored, with a "
        "note, for a checkpoint without the head",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the generated text")
    p.add_argument(
        "--sharded",
        action="store_true",
        help="tensor parallel across the processes mlx.launch started (on by itself when a "
        "distributed group of more than one process is found); rank 0 prints",
    )
    return p


def _check_text(text: str, source: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise UserError(f"{source} is not valid UTF-8 text (at character {e.start})") from None
    return text


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return _check_text(arg, "--prompt")
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UserError("--prompt - reads stdin, but stdin is closed")
    buffer = getattr(sys.stdin, "buffer", None)
    try:
        text = buffer.read().decode("utf-8") if buffer is not None else sys.stdin.read()
    except UnicodeDecodeError as e:
        raise UserError(f"stdin is not valid UTF-8 text (at byte {e.start})") from None
    except OSError as e:  # a failing read (EIO from a hung-up terminal, ...)
        raise UserError(f"cannot read stdin: {_one_line(e)}") from None
    # `echo Hello | ...` must prompt what `--prompt Hello` does: drop the final line break(s)
    return _check_text(text.rstrip("\r\n"), "stdin")


def _check_args(args: argparse.Namespace) -> str:
    """Validate what can be checked before loading; returns the prompt text."""
    from .sampling import check_sampling

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.prefill_step_size < 1:
        raise UserError(f"--prefill-step-size must be at least 1 (got {args.prefill_step_size})")
    try:
        check_sampling(args.temp, args.top_p, args.top_k, args.min_p, cli=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.mtp_k is not None:
        if args.no_mtp:
            raise UserError("--mtp-k sets the MTP drafts; it cannot go with --no-mtp")
        if args.mtp_k < 1:
            raise UserError(f"--mtp-k must be at least 1 (got {args.mtp_k})")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UserError(f"--seed must be an integer in [0, 2**64 - 1] (got {args.seed})")
    if args.system is not None:
        if args.no_chat_template:
            raise UserError(
                "--system needs the chat template; it cannot go with --no-chat-template"
            )
        _check_text(args.system, "--system")
    prompt = _read_prompt(args.prompt)
    if not prompt.strip():
        raise UserError("the prompt is empty")
    for f in args.image:
        if Path(f).is_dir():
            raise UserError(f"cannot read image {f!r}: it is a directory")
        if not Path(f).is_file():
            raise UserError(f"cannot read image {f!r}: no such file")
    for f in args.video:
        if Path(f).is_dir():
            raise UserError(f"cannot read video {f!r}: it is a directory")
        if not Path(f).is_file():
            raise UserError(f"cannot read video {f!r}: no such file")
    return prompt


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_config(model: str):
    """(checkpoint folder, config.json dict, ModelConfig), before any weight is read."""
    from .loader import read_model_config, resolve_path

    try:
        path = resolve_path(model)
        return (path, *read_model_config(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(_one_line(e)) from e


def _load(path, dtype: str | None, group=None):
    """Load; with a distributed group, lazily, so each rank reads and keeps only its share."""
    import mlx.core as mx

    from .loader import load

    try:
        if group is None:
            return load(path, dtype=dtype)
        m, tokenizer = load(path, dtype=dtype, lazy=True)
        m.shard(group)
        for layer in m.layers:  # one layer's whole tensors in memory at a time, not all
            mx.eval(layer.parameters())
        mx.eval(m.parameters())
        return m, tokenizer
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(_one_line(e)) from e


def _group(sharded: bool):
    """The distributed group to shard over; None for a single process."""
    import mlx.core as mx

    group = mx.distributed.init() if mx.distributed.is_available() else None
    if group is None or group.size() == 1:
        if sharded:
            raise UserError("--sharded needs several processes: start them with mlx.launch")
        return None
    return group


def _open_images(files: list[str]) -> list:
    from .processor import _open_image

    try:
        return [_open_image(f) for f in files]
    except ValueError as e:
        raise UserError(_one_line(e)) from e


def build_prompt(
    tokenizer, prompt: str, args: argparse.Namespace, n_images: int, n_videos: int = 0
) -> str:
    """The prompt text to tokenize: the chat template applied unless --no-chat-template."""
    from .processor import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START

    image_slot = VISION_START + IMAGE_TOKEN + VISION_END
    video_slot = VISION_START + VIDEO_TOKEN + VISION_END
    text_tok = getattr(tokenizer, "tokenizer", tokenizer)
    if args.no_chat_template or getattr(text_tok, "chat_template", None) is None:
        if args.system is not None:
            raise UserError("--system needs a chat template, and this model has none")
        return image_slot * n_images + video_slot * n_videos + prompt
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if n_images or n_videos:
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
        content += [{"type": "text", "text": prompt}]
    else:
        content = prompt
    messages.append({"role": "user", "content": content})
    kwargs = {}
    if args.enable_thinking is not None:
        kwargs["enable_thinking"] = args.enable_thinking
    text = text_tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **kwargs
    )
    if n_images and IMAGE_TOKEN not in text:
        # a template that does not render image entries: put the placeholders first
        text = image_slot * n_images + text
    if n_videos and VIDEO_TOKEN not in text:
        text = video_slot * n_videos + text
    return text


def run(args: argparse.Namespace) -> int:
    prompt = _check_args(args)
    model_path = args.model or default_model()
    if args.model is None and not Path(model_path).is_dir():
        raise UserError(f"the embedded model is missing from the package ({model_path})")
    images = _open_images(args.image) if args.image else []
    path, config_dict, config = _read_config(model_path)
    if images or args.video:
        from .loader import is_vision_language

        if not is_vision_language(config_dict):
            flag = "--image" if images else "--video"
            raise UserError(
                f"{model_path} is a text-only model: {flag} needs a vision-language checkpoint"
            )

    import mlx.core as mx
    import numpy as np

    from .generation import stream_generate

    group = _group(args.sharded)
    seed = args.seed
    if group is not None and seed is None:
        # Rank 0 draws the seed; all_sum hands it to the others (they add zeros).
        mine = int(np.random.randint(0, 2**31 - 1)) if group.rank() == 0 else 0
        seed = int(mx.distributed.all_sum(mx.array(mine), group=group).item())
    if seed is not None:
        mx.random.seed(seed)
    model, tokenizer = _load(path, args.dtype, group)
    text = build_prompt(tokenizer, prompt, args, len(images), len(args.video))
    from .speculative import has_mtp

    if args.mtp_k is not None and not has_mtp(model):
        print(
            f"note: {model_path} has no multi-token-prediction head (mtp.*): --mtp-k ignored",
            file=sys.stderr,
        )

    out = sys.stdout if group is None or group.rank() == 0 else io.StringIO()
    max_positions = config.text_config.max_position_embeddings
    last = None
    try:
        for last in stream_generate(
            model,
            tokenizer,
            text,
            images=images or None,
            videos=args.video or None,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            prefill_step_size=args.prefill_step_size,
            mtp=True if args.mtp or args.mtp_k is not None else False if args.no_mtp else "auto",
            mtp_k=args.mtp_k or 1,
        ):
            if last.generation_tokens == 1:
                # only now, so that an error in the prompt leaves stdout empty
                if last.prompt_tokens > max_positions:
                    print(
                        f"warning: the prompt has {last.prompt_tokens} tokens, more than the "
                        f"model's max_position_embeddings ({max_positions}); expect poor output",
                        file=sys.stderr,
                    )
                if not args.quiet:
                    print("=" * 10, file=out)
            print(last.text, end="", flush=True, file=out)
    except (ValueError, ImportError) as e:
        raise UserError(_one_line(e)) from e
    print(file=out)
    if not args.quiet and last is not None:
        print("=" * 10, file=out)
        print(
            f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec", file=out
        )
        print(
            f"Generation: {last.generation_tokens} tokens, "
            f"{last.generation_tps:.3f} tokens-per-sec",
            file=out,
        )
        if last.mtp_acceptance is not None:
            print(f"MTP: {last.mtp_acceptance:.1%} of drafted tokens accepted", file=out)
        print(f"Peak memory: {last.peak_memory:.3f} GB", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return int(e.code or 0)
    try:
        return run(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`... | head`): stop quietly, no traceback; point stdout at
        # /dev/null so the flush at exit does not raise again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
