"""Which UNet parameters the private stage may change: transformer blocks by name or level, plus the
class embedding table. Everything else is frozen and stays bit-identical.

`--dp-blocks` syntax (blocks are named in ldm/unet.py: down{k}_{i}, mid, up{k}_{i}):
    all                 every transformer block
    encoder             the down{k}_{i} blocks;  decoder: the up{k}_{i} blocks;  mid: the middle block
    decoder+mid         a union of the above, joined by '+'
    levels=1,2          every block at UNet levels 1 and 2 (the middle block belongs to the deepest level)
    up1_0,up1_1,mid     an explicit comma-separated list of block names

With `--dp-lora RANK` (dp/lora.py) the chosen blocks' attention projections get LoRA adapters, and only the
adapters' factors are trained in those blocks: their own weights, the adapted projections' included, stay frozen.
"""

from dp.lora import add_lora, factor_projections, lora_generator
from ldm.errors import UserError

GROUPS = {"all": lambda n: True, "encoder": lambda n: n.startswith("down"),
          "decoder": lambda n: n.startswith("up"), "mid": lambda n: n == "mid"}


def parse_blocks(spec, unet):
    """Block names (in the UNet's order) chosen by `spec`; a bad spec is a UserError listing what exists."""
    names = list(unet.attn.keys())
    spec = spec.strip()
    if spec.startswith("levels="):
        try:
            levels = {int(v) for v in spec[len("levels="):].split(",") if v.strip()}
        except ValueError:
            raise UserError(f"--dp-blocks {spec!r}: levels must be integers, e.g. levels=1,2") from None
        bad = sorted(levels - set(range(1, unet.levels + 1)))
        if bad or not levels:
            raise UserError(f"--dp-blocks {spec!r}: the UNet has levels 1..{unet.levels}")
        chosen = [n for n in names if unet.block_level(n) in levels]
    elif all(part in GROUPS for part in spec.split("+")):
        chosen = [n for n in names if any(GROUPS[part](n) for part in spec.split("+"))]
    else:
        wanted = [v.strip() for v in spec.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in names]
        if unknown or not wanted:
            raise UserError(f"--dp-blocks {spec!r}: unknown block(s) {', '.join(unknown) or '(none given)'}; "
                            f"valid: all, encoder, decoder, mid, levels=K,..., or names from {', '.join(names)}")
        chosen = [n for n in names if n in wanted]
    if not chosen:
        raise UserError(f"--dp-blocks {spec!r} selects no transformer block; blocks: {', '.join(names)}")
    return chosen


def select_parameters(unet, spec, class_embed=True, lora=False):
    """Freeze the UNet except the chosen blocks (with `lora`: only the LoRA factors in them) and the class
    embedding; return {name: parameter} to train."""
    prefixes = tuple(f"attn.{b}." for b in parse_blocks(spec, unet))
    factors = factor_projections(unet)
    selected = {}
    for name, p in unet.named_parameters():
        p.requires_grad_((name.startswith(prefixes) and (name in factors or not lora))
                         or (class_embed and name.startswith("class_embed.")))
        if p.requires_grad:
            selected[name] = p
    return selected


def select_trainable(unet, cfg):
    """The private stage's selection: adapt `unet` in place as --dp-lora asks (seeded by --seed), then freeze it
    except what --dp-blocks and --dp-class-embed choose. Returns {name: parameter} to train."""
    dp_cfg = cfg.dp
    if dp_cfg.dp_lora:
        add_lora(unet, parse_blocks(dp_cfg.dp_blocks, unet), dp_cfg.dp_lora, lora_generator(cfg.run.seed))
    return select_parameters(unet, dp_cfg.dp_blocks, dp_cfg.dp_class_embed, lora=dp_cfg.dp_lora > 0)


def selection_size(unet, selected):
    """(number of trainable parameters, their share of the parameters of the UNet's plain architecture, that is
    without LoRA factors)."""
    n = sum(p.numel() for p in selected.values())
    factors = factor_projections(unet)
    return n, n / sum(p.numel() for name, p in unet.named_parameters() if name not in factors)
