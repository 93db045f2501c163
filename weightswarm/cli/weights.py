"""Commands on weight files: convert, manifest, export, smoke."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from weightswarm.cli.common import CONTEXT, PATH, handle_errors, size
from weightswarm.cli.console import Reporter
from weightswarm.convert.export import DEFAULT_SHARD_BYTES, FORMATS
from weightswarm.core.errors import OptionError, VerificationError
from weightswarm.core.units import plural, size_text
from weightswarm.formats.dtypes import FLOAT_NAMES
from weightswarm.formats.perexpert import GRANULARITIES

DTYPES = list(FLOAT_NAMES)


@click.command(context_settings=CONTEXT, short_help="Rewrite a checkpoint as one file per expert.")
@click.argument("src", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, metavar="PATH", help="The new folder to write.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="expert", show_default=True,
              help="One file per expert, or per layer and expert.")
@click.option("--dtype", type=click.Choice(DTYPES), help="[default: the source's]")
@click.option("--experts", metavar="LIST", help="Only the dense tensors and these experts (0,3 or 0-3) [default: all].")
@handle_errors
def convert(src: Path, output: Path, granularity: str, dtype: str | None, experts: str | None) -> None:
    """Restructure a checkpoint (any supported layout) into per-expert safetensors files plus a manifest."""
    from weightswarm.convert.convert import ConvertOptions
    from weightswarm.convert.convert import convert as run_convert
    from weightswarm.formats.perexpert import parse_experts

    rep = Reporter()
    opts = ConvertOptions(granularity=granularity, dtype=dtype, experts=parse_experts(experts) if experts else None)
    manifest = run_convert(src, output, opts, rep.tracker("converting"))
    rep.close()
    click.echo(f"wrote {output}: {plural(len(manifest['files']), 'file')}, "
               f"{plural(len(manifest['tensors']), 'tensor')} from a {manifest['source']['layout']} checkpoint; "
               "manifest.json last")


@click.command(context_settings=CONTEXT, short_help="Write a blake3 manifest of a folder.")
@click.argument("folder", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, metavar="PATH", help="The manifest file to write.")
@click.option("--tensors", is_flag=True, help="Also hash every tensor of the weight files.")
@handle_errors
def manifest(folder: Path, output: Path, tensors: bool) -> None:
    """Write a blake3 manifest of FOLDER: every file, and with --tensors every tensor."""
    from weightswarm.core.atomic import atomic_write_bytes
    from weightswarm.core.paths import check_output_file
    from weightswarm.formats.manifest import manifest_bytes
    from weightswarm.verify.manifest import build_manifest

    check_output_file(output)
    m = build_manifest(folder, tensors=tensors)
    atomic_write_bytes(output, manifest_bytes(m))
    click.echo(f"wrote {output}: {plural(len(m['files']), 'file')}" +
               (f", {plural(len(m['tensors']), 'tensor')}" if tensors else ""))


@click.command(context_settings=CONTEXT, short_help="Write HF shards or Mistral's consolidated.00.pth.")
@click.argument("src", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, metavar="PATH", help="The new folder to write.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True)
@click.option("--shard-size", default=size_text(DEFAULT_SHARD_BYTES), show_default=True, metavar="BYTES",
              help="Largest Hugging Face shard.")
@handle_errors
def export(src: Path, output: Path, fmt: str, shard_size: str) -> None:
    """Reassemble SRC (per-expert or any supported layout) as HF shards or Mistral's consolidated.00.pth."""
    from weightswarm.convert.export import export as run_export

    written = run_export(src, output, fmt, size("--shard-size", shard_size))
    click.echo(f"wrote {output}: " + ", ".join(p.name for p in written))


@click.command(context_settings=CONTEXT, short_help="Run the assembled model and check it.")
@click.argument("model_dir", type=PATH)
@click.option("--prompt", metavar="TEXT", help="Text prompt, through MODEL_DIR/tokenizer.model (BOS first).")
@click.option("--tokens", metavar="IDS", help="Comma-separated token ids instead of a prompt (1,415,2936).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=16, show_default=True, metavar="N")
@click.option("--reference", type=PATH, metavar="PATH",
              help="The original checkpoint (any layout): logits must agree (bit for bit in float32).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES),
              help="[default: the checkpoint's; bf16 loads without a copy] float32 compares bit for bit.")
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True, metavar="N")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@handle_errors
def smoke(model_dir, prompt, tokens, max_new_tokens, reference, device, dtype, temperature, top_p, seed,
          as_json) -> None:
    """Assemble the model from MODEL_DIR and prove it runs right: generation, KV cache, routing, reference."""
    from weightswarm.runner.smoke import parse_tokens, print_report
    from weightswarm.runner.smoke import smoke as run_smoke

    if temperature != temperature:  # NaN slips through FloatRange
        raise OptionError("--temperature", temperature, "must be a number")
    result = run_smoke(model_dir, prompt=prompt, tokens=parse_tokens(tokens) if tokens else None,
                       max_new_tokens=max_new_tokens, reference=reference, device=device, dtype=dtype, seed=seed,
                       temperature=temperature, top_p=top_p)
    if as_json:
        click.echo(json.dumps(result))
    else:
        print_report(result)
    if not result["passed"]:
        sys.exit(VerificationError.exit_code)
