"""`archfarm styles`, `styles add` and `styles show`: built-in styles and the farm's stored style packs."""

from __future__ import annotations

from typing import Annotated

import typer

from producer.console import Commands, fail, out
from shared.config import Settings
from shared.packs import load_pack, pack_names, store_pack
from shared.spec import Style
from shared.storage import Storages
from shared.styles import CATALOG

styles_app = Commands(
    invoke_without_command=True,
    help="Styles: the built-in ones and the farm's stored style packs (`styles add NAME ...`, `styles show NAME`).",
)


def _storages() -> Storages:
    """The farm's storage, where packs are kept: nothing else (no database) is needed to read or write them."""
    return Storages(Settings())


@styles_app.callback()
def styles(context: typer.Context) -> None:
    """The built-in styles with their prompts, then the names of the farm's stored packs."""
    if context.invoked_subcommand is not None:
        return
    for name, (prompt, negative) in CATALOG.items():
        out.print(f"{name}\n  prompt: {prompt}\n  negative: {negative}", markup=False)
    for name in pack_names(_storages().open()):
        out.print(f"{name} (pack: `archfarm styles show {name}`)", markup=False)


@styles_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The pack's name, as jobs will name it (not a built-in's).")],
    prompt: Annotated[str, typer.Option("--prompt", help="The style's prompt.")],
    negative: Annotated[str, typer.Option("--negative", help="Its negative prompt.")] = "",
    lora: Annotated[
        str | None, typer.Option("--lora", help="A UNet LoRA .safetensors: a path, file:// or s3:// URL.")
    ] = None,
    weight: Annotated[float, typer.Option("--weight", help="The LoRA's weight (0-2).")] = 1.0,
    reference: Annotated[
        list[str] | None,
        typer.Option("--reference", help="A mood-board image (path, file:// or s3://); repeat for several."),
    ] = None,
    reference_scale: Annotated[float, typer.Option("--reference-scale", help="The mood board's scale (0-2).")] = 0.8,
    transfer: Annotated[
        str, typer.Option("--transfer", help="style: take its look, not its layout (InstantStyle); all: both.")
    ] = "style",
    palette: Annotated[
        str | None,
        typer.Option(
            "--palette", help="The pack's palette, #rrggbb colours (#d8c8b0,#6b4f3a): views are measured on it."
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds", help="The pack's seed family, in order (1234,87,5150): its images' seeds in every job."
        ),
    ] = None,
) -> None:
    """Store a style pack in the farm's storage: its prompts, its LoRA, its mood board, its palette and its seed
    family, checked, pinned by content hash and copied beside the plans. Storing a name again replaces the pack
    for later jobs; earlier jobs keep theirs."""
    from shared.spec import parse_model

    loras = [] if lora is None else [{"file": lora, "weight": weight}]
    document: dict[str, object] = {"name": name, "prompt": prompt, "negative_prompt": negative, "loras": loras}
    if reference:
        document["reference"] = {"images": reference, "scale": reference_scale, "transfer": transfer}
    if palette is not None:
        document["palette"] = [colour.strip() for colour in palette.split(",")]
    if seeds is not None:
        listed = [seed.strip() for seed in seeds.split(",")]
        document["seeds"] = [int(seed) if seed.isdigit() else seed for seed in listed]  # the rest refused by name
    stored = store_pack(_storages(), parse_model(Style, document, "styles add"))
    out.print(_describe(stored), markup=False)


@styles_app.command("show")
def show(name: Annotated[str, typer.Argument(help="A stored pack's or a built-in style's name.")]) -> None:
    """A style: its prompts and, for a pack, its LoRA with its hash and weight."""
    style = load_pack(_storages().open(), name)
    if style is None and name in CATALOG:
        prompt, negative = CATALOG[name]
        style = Style(name=name, prompt=prompt, negative_prompt=negative)
    if style is None:
        fail(f"no style pack or built-in style {name!r}")
    out.print(_describe(style), markup=False)


def _describe(style: Style) -> str:
    lines = [style.name, f"  prompt: {style.prompt}", f"  negative: {style.negative_prompt}"]
    lines += [f"  lora: {lora.file} (sha256 {lora.file_sha256}), weight {lora.weight:g}" for lora in style.loras]
    if style.reference is not None:
        board = style.reference
        lines.append(f"  mood board ({board.transfer}, scale {board.scale:g}):")
        lines += [
            f"    {url} (sha256 {digest})" for url, digest in zip(board.images, board.images_sha256 or [], strict=False)
        ]
    if style.palette:
        lines.append(f"  palette: {', '.join(style.palette)}")
    if style.seeds:
        lines.append(f"  seed family: {', '.join(map(str, style.seeds))}")
    return "\n".join(lines)
