"""Swap fastdiff's kernels into models you already run: guided-diffusion and diffusers UNets.

    report = fastdiff.patch(model)      # fused GroupNorm(+scale/shift)+SiLU and attention
    print(report)                       # what was replaced, what was left alone and why
    fastdiff.unpatch(model)             # the original modules and processors, exactly

Patching works on the instance you pass (no class is monkey-patched): selected child
modules are swapped for fastdiff modules that share the original Parameter objects, a
few blocks get an instance-level forward that routes their norm through the fused op,
and diffusers attention gets a processor through ``set_attn_processor``. Parameter
objects, parameter order and state_dict keys stay the same, so checkpoints load either
way and an optimizer built before patching keeps training the same tensors. Everything
the patched modules compute goes through the ``torch.ops.fastdiff`` custom ops: Triton on
CUDA, a torch fallback on CPU.

Recognised structures (matched by structure and class name, so guided-diffusion's own
classes work as well as fastdiff's torch-backend UNet, which has the same module tree):

* any plain ``nn.Sequential`` holding a GroupNorm followed by ``nn.SiLU`` (GD's
  ``in_layers``, ``out_layers`` and output head ``out``) → one fused op, the SiLU slot an
  ``nn.Identity``;
* GD ``ResBlock`` with ``use_scale_shift_norm``: its ``out_layers`` norm, FiLM
  scale/shift and SiLU → one op (an instance-level ``_forward`` with GD's math);
* GD ``AttentionBlock``: ``norm`` → the op without activation; ``attention``
  (``QKVAttentionLegacy``/``QKVAttention``) → ``qkv_attention``;
* GD ``AttentionPool2d`` (the classifier's attention head): its ``attention`` →
  ``qkv_attention`` (HW + 1 tokens). The rest of GD's classifier (``EncoderUNetModel``) is
  covered above: ResBlocks, AttentionBlocks, the norm + SiLU of the adaptive/attention
  heads and spatial_v2's GroupNorm + SiLU over a [N, 2048] vector are plain Sequentials;
  ``SuperResModel`` is a UNet;
* diffusers ``ResnetBlock2D`` with a SiLU nonlinearity: norm1 + SiLU and norm2 (+ the
  ``scale_shift`` time embedding) + SiLU → the op (an instance-level forward with
  diffusers' math); the ``conv_norm_out`` + ``conv_act`` head of ``UNet2DModel`` and
  ``UNet2DConditionModel``;
* diffusers ``Attention`` with the default processor: a processor that runs
  ``fastdiff.ops.attention`` (self- and cross-attention), and its ``group_norm`` → the
  op without activation.

Do not patch a model whose own code indexes into such an ``nn.Sequential`` and computes
between the norm and the SiLU (GD's scale-shift ResBlock is the case handled above).
Patch before ``torch.compile``.
"""
import dataclasses
import sys
import types

import torch
import torch.nn as nn

from fastdiff.models.layers import (
    TRITON_MAX_HEAD_DIM,
    GroupNormAct,
    MultiHeadQKVAttention,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    fuse_norm_act,
)

KERNELS = ("group_norm_silu", "attention")
# Where a patched root keeps the records unpatch() replays (a plain attribute: it is not
# a module, parameter or buffer, so state_dict and parameters() never see it).
_RECORDS_ATTR = "_fastdiff_patches"
_GD_QKV_CLASSES = ("QKVAttentionLegacy", "QKVAttention")
# GD modules that hold a QKV attention as ``attention``.
_GD_ATTENTION_HOLDERS = ("AttentionBlock", "AttentionPool2d")


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class PatchEntry:
    """One module the patcher looked at: its path in the model, its class and what
    happened (the change made, or why it was left alone)."""

    path: str
    module: str
    detail: str

    def __str__(self):
        return f"{self.path or '(root)'} [{self.module}]: {self.detail}"


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did. ``replaced``: changes made by this call;
    ``already_patched``: modules that already ran fastdiff's kernels (patching twice is
    harmless); ``left_alone``: candidates that were not touched, with the reason."""

    kernels: tuple
    replaced: list = dataclasses.field(default_factory=list)
    already_patched: list = dataclasses.field(default_factory=list)
    left_alone: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"fastdiff.patch(kernels={', '.join(self.kernels)}): {len(self.replaced)} replaced, "
                 f"{len(self.already_patched)} already patched, {len(self.left_alone)} left alone"]
        for title, entries in (("replaced", self.replaced), ("already patched", self.already_patched),
                               ("left alone", self.left_alone)):
            if entries:
                lines.append(f"{title}:")
                lines.extend(f"  {entry}" for entry in entries)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Undo records. Plain objects holding module references (not closures), so a deepcopy of a
# patched model carries records that point at the copy's own modules.
# ---------------------------------------------------------------------------------------

_MISSING = object()


@dataclasses.dataclass
class _ModuleSwap:
    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module

    def undo(self, root):
        # The replacement's current parameters win: a .to()/.half() that rebuilt Parameter
        # objects while patched must not bring stale tensors back.
        for pname, param in self.replacement.named_parameters(recurse=False):
            if pname in self.original._parameters:
                setattr(self.original, pname, param)
        self.original.train(self.replacement.training)
        setattr(self.parent, self.name, self.original)


@dataclasses.dataclass
class _ForwardOverride:
    module: nn.Module
    name: str
    previous: object

    def undo(self, root):
        if self.previous is _MISSING:
            del self.module.__dict__[self.name]
        else:
            self.module.__dict__[self.name] = self.previous


@dataclasses.dataclass
class _ProcessorSwap:
    attention: nn.Module
    original: object

    def undo(self, root):
        _set_processors(root, {self.attention: self.original})


def _set_processors(root, processors):
    """Install ``{Attention module: processor}`` through the model's own
    ``set_attn_processor`` when it has one (diffusers' models do), else per module."""
    if not processors:
        return
    if hasattr(root, "set_attn_processor") and hasattr(root, "attn_processors"):
        current = dict(root.attn_processors)
        for name in current:
            module = root.get_submodule(name[: -len(".processor")])
            if module in processors:
                current[name] = processors[module]
        root.set_attn_processor(current)
        if all(module.processor is proc for module, proc in processors.items()):
            return
    for module, proc in processors.items():  # modules the root's traversal does not reach
        module.set_processor(proc)


# ---------------------------------------------------------------------------------------
# Replacement forwards (callable objects, not closures, so deepcopy and pickle work)
# ---------------------------------------------------------------------------------------

class ScaleShiftResBlockForward:
    """guided-diffusion ``ResBlock._forward`` with ``use_scale_shift_norm=True``, where
    ``out_layers[0]`` is a :class:`GroupNormAct` taking the FiLM scale/shift and
    ``out_layers[1]`` the Identity left by folding the SiLU into it.

    fastdiff's own ResBlock._forward is GD's math and already routes the scale/shift into a
    fused out norm; a GD block has the same attributes, so it runs that one implementation.
    """

    def __init__(self, block):
        self.block = block

    def __call__(self, x, emb):
        return ResBlock._forward(self.block, x, emb)


class ResnetBlock2DForward:
    """diffusers ``ResnetBlock2D.forward`` (0.42) with ``norm1``/``norm2`` as
    :class:`GroupNormAct` modules that apply the SiLU, and norm2 taking the
    ``scale_shift`` time embedding. Everything else — resampling, dropout, the shortcut,
    ``output_scale_factor`` — runs in diffusers' order. The deprecated positional/``scale``
    arguments are accepted and ignored, as diffusers ignores them."""

    def __init__(self, block):
        self.block = block

    def __call__(self, input_tensor, temb, *args, **kwargs):
        block = self.block
        hidden = block.norm1(input_tensor)
        if block.upsample is not None:
            if hidden.shape[0] >= 64:  # diffusers' guard for nearest upsampling of big batches
                input_tensor = input_tensor.contiguous()
                hidden = hidden.contiguous()
            input_tensor = block.upsample(input_tensor)
            hidden = block.upsample(hidden)
        elif block.downsample is not None:
            input_tensor = block.downsample(input_tensor)
            hidden = block.downsample(hidden)
        hidden = block.conv1(hidden)

        if block.time_emb_proj is not None:
            if not block.skip_time_act:
                temb = block.nonlinearity(temb)
            temb = block.time_emb_proj(temb)[:, :, None, None]
        if block.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs temb")
            scale, shift = torch.chunk(temb, 2, dim=1)
            hidden = block.norm2(hidden, scale=scale, shift=shift)
        else:
            if temb is not None:
                hidden = hidden + temb
            hidden = block.norm2(hidden)

        hidden = block.dropout(hidden)
        hidden = block.conv2(hidden)
        if block.conv_shortcut is not None:
            if block.training:  # diffusers makes the shortcut input contiguous in training only
                input_tensor = input_tensor.contiguous()
            input_tensor = block.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / block.output_scale_factor


class FastdiffAttnProcessor:
    """A diffusers attention processor that runs :func:`fastdiff.ops.attention`.

    Mirrors ``AttnProcessor2_0`` step by step (spatial_norm, 4-D inputs, group_norm,
    norm_cross, output projection and dropout, residual_connection,
    rescale_output_factor); only the attention product is fastdiff's. The softmax scale
    is the one the replaced processor used: ``AttnProcessor2_0`` 1/sqrt(head_dim),
    ``AttnProcessor`` ``attn.scale``. Calls the fused kernel cannot serve — an attention
    mask, or extra arguments — go to the replaced processor, kept as ``original``.
    """

    def __init__(self, original, use_module_scale):
        self.original = original
        self.use_module_scale = use_module_scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if attention_mask is not None or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, *args, **kwargs)
        from fastdiff.ops.attention import attention

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size = source.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        out = attention(query, key, value, scale=attn.scale if self.use_module_scale else None)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------
# Recognising modules
# ---------------------------------------------------------------------------------------

def _join(path, name):
    """The path of child ``name`` under ``path`` ("" is the root), as named_modules() spells it."""
    return f"{path}.{name}" if path else name


def _group_norm_problem(module):
    """Why ``module`` cannot become a GroupNormAct, or None when it can."""
    if not isinstance(module, nn.GroupNorm):
        return f"{type(module).__name__} is not a GroupNorm"
    if not module.affine:
        return "GroupNorm without affine weight/bias"
    # GD's GroupNorm32 (norm in fp32, cast back) is what the op computes; any other
    # subclass with its own forward might compute something else.
    if type(module).forward is not nn.GroupNorm.forward and type(module).__name__ != "GroupNorm32":
        return f"{type(module).__name__} overrides GroupNorm.forward"
    return None


def _is_plain_silu(module):
    return type(module) is nn.SiLU


def _is_plain_sequential(module):
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _diffusers_types():
    """diffusers' classes, or None when the caller has not imported diffusers (a model
    that contains diffusers modules always has). Importing it ourselves would cost
    seconds for nothing."""
    if "diffusers" not in sys.modules:
        return None
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    return types.SimpleNamespace(resnet=ResnetBlock2D, attention=Attention,
                                 processors=(AttnProcessor2_0, AttnProcessor),
                                 unets=(UNet2DModel, UNet2DConditionModel))


def _gd_attention_module(block):
    """The QKV attention child of a GD-style AttentionBlock or AttentionPool2d, or None."""
    if type(block).__name__ not in _GD_ATTENTION_HOLDERS:
        return None
    attention = getattr(block, "attention", None)
    if type(attention).__name__ not in _GD_QKV_CLASSES or not hasattr(attention, "n_heads"):
        return None
    return attention


def _gd_attention_width(block):
    """The channels a GD attention holder splits into heads (None when unknown):
    AttentionBlock's ``channels``; an AttentionPool2d's embedding width, its qkv_proj input
    (GD's pool keeps no width attribute)."""
    if type(block).__name__ == "AttentionPool2d":
        return getattr(getattr(block, "qkv_proj", None), "in_channels", None)
    return getattr(block, "channels", None)


def _is_gd_resblock(block):
    return type(block).__name__ == "ResBlock" and all(
        _is_plain_sequential(getattr(block, name, None))
        for name in ("in_layers", "emb_layers", "out_layers"))


# ---------------------------------------------------------------------------------------
# The patcher
# ---------------------------------------------------------------------------------------

class _Patcher:
    """One patch() call: visits every module once with the block handlers, then fuses
    the remaining GroupNorm + SiLU pairs in plain Sequentials, recording every change."""

    def __init__(self, root, kernels):
        self.root = root
        self.kernels = kernels
        self.report = PatchReport(kernels=kernels)
        self.records = []
        self.accounted_norms = set()  # ids of GroupNorms whose fate is already reported
        self.claimed_sequentials = set()  # Sequentials a block handler is responsible for
        self.new_processors = {}
        self.diffusers = _diffusers_types()

    # -- bookkeeping ---------------------------------------------------------------------
    def _replaced(self, path, module, detail):
        self.report.replaced.append(PatchEntry(path, type(module).__name__, detail))

    def _already(self, path, module, detail):
        self.report.already_patched.append(PatchEntry(path, type(module).__name__, detail))

    def _left(self, path, module, reason):
        self.report.left_alone.append(PatchEntry(path, type(module).__name__, reason))

    def _swap(self, parent, name, replacement):
        original = getattr(parent, name)
        self.records.append(_ModuleSwap(parent, name, original, replacement))
        setattr(parent, name, replacement)

    def _fuse_norm(self, parent, name, act):
        """Swap ``parent.<name>`` (a GroupNorm) for a GroupNormAct sharing its parameters."""
        norm = getattr(parent, name)
        self.accounted_norms.add(id(norm))
        self._swap(parent, name, GroupNormAct.from_group_norm(norm, act=act))

    def _fuse_sequential_pair(self, seq, index):
        """Fold ``seq[index]`` (GroupNorm) and ``seq[index + 1]`` (SiLU) into one op,
        recording both slots. Reuses the models' own :func:`fuse_norm_act`."""
        norm, silu = seq[index], seq[index + 1]
        self.accounted_norms.add(id(norm))
        fuse_norm_act(seq, index)
        self.records.append(_ModuleSwap(seq, str(index), norm, seq[index]))
        self.records.append(_ModuleSwap(seq, str(index + 1), silu, seq[index + 1]))

    def _override(self, module, name, value):
        self.records.append(_ForwardOverride(module, name, module.__dict__.get(name, _MISSING)))
        module.__dict__[name] = value

    # -- run -----------------------------------------------------------------------------
    def run(self):
        modules = list(self.root.named_modules())
        for path, module in modules:
            self._visit(path, module)
        if "group_norm_silu" in self.kernels:
            for path, module in modules:
                if _is_plain_sequential(module) and id(module) not in self.claimed_sequentials:
                    self._fuse_sequential(path, module)
            self._report_other_norms()
        _set_processors(self.root, self.new_processors)
        return self.report, self.records

    def _visit(self, path, module):
        norms = "group_norm_silu" in self.kernels
        attention = "attention" in self.kernels
        dif = self.diffusers
        if dif is not None and isinstance(module, dif.resnet):
            if norms:
                self._patch_resnet_block_2d(path, module)
        elif dif is not None and isinstance(module, dif.attention):
            if norms and module.group_norm is not None:
                self._patch_standalone_norm(_join(path, "group_norm"), module, "group_norm")
            if attention:
                self._patch_diffusers_attention(path, module)
        elif _gd_attention_module(module) is not None:
            if norms and type(module).__name__ == "AttentionBlock":  # a pool has no norm
                self._patch_standalone_norm(_join(path, "norm"), module, "norm")
            if attention:
                self._patch_gd_attention(path, module)
        elif _is_gd_resblock(module) and getattr(module, "use_scale_shift_norm", False):
            self.claimed_sequentials.add(id(module.out_layers))
            if norms:
                self._patch_gd_scale_shift_resblock(path, module)
        if dif is not None and norms and isinstance(module, dif.unets):
            self._patch_unet_head(path, module)

    # -- norms ---------------------------------------------------------------------------
    def _fuse_sequential(self, path, seq):
        for index in range(len(seq) - 1):
            norm, nxt = seq[index], seq[index + 1]
            here = _join(path, str(index))
            if isinstance(norm, GroupNormAct) and norm.act and isinstance(nxt, nn.Identity):
                self._already(here, norm, "GroupNorm + SiLU already fused")
            elif isinstance(norm, nn.GroupNorm) and _is_plain_silu(nxt):
                problem = _group_norm_problem(norm)
                if problem:
                    self.accounted_norms.add(id(norm))
                    self._left(here, norm, problem)
                else:
                    self._fuse_sequential_pair(seq, index)
                    self._replaced(here, norm, "GroupNorm + SiLU → group_norm_silu")

    def _patch_standalone_norm(self, path, parent, name):
        norm = getattr(parent, name)
        if isinstance(norm, GroupNormAct):
            self._already(path, norm, "norm already runs group_norm_silu")
            return
        problem = _group_norm_problem(norm)
        self.accounted_norms.add(id(norm))
        if problem:
            self._left(path, norm, problem)
            return
        self._fuse_norm(parent, name, act=False)
        self._replaced(path, norm, "GroupNorm → group_norm_silu (act=False)")

    def _patch_gd_scale_shift_resblock(self, path, block):
        out_layers = block.out_layers
        norm = out_layers[0]
        if isinstance(norm, GroupNormAct):
            self._already(path, block, "out_layers norm + scale/shift + SiLU already fused")
            return
        problem = _group_norm_problem(norm)
        if problem is None and not (len(out_layers) > 1 and _is_plain_silu(out_layers[1])):
            problem = "out_layers[1] is not nn.SiLU"
        missing = [a for a in ("_forward", "updown", "h_upd", "x_upd", "emb_layers",
                               "skip_connection")
                   if not hasattr(block, a)]
        if problem is None and missing:
            problem = f"scale-shift ResBlock without {', '.join(missing)}"
        if problem:
            self.accounted_norms.add(id(norm))
            self._left(_join(path, "out_layers.0"), norm, problem)
            return
        self._fuse_sequential_pair(out_layers, 0)
        self._override(block, "_forward", ScaleShiftResBlockForward(block))
        self._replaced(path, block, "out_layers GroupNorm · (1 + scale) + shift, SiLU → group_norm_silu")

    def _patch_resnet_block_2d(self, path, block):
        if isinstance(block.norm1, GroupNormAct) and isinstance(block.__dict__.get("forward"),
                                                               ResnetBlock2DForward):
            self._already(path, block, "norm1/norm2 + SiLU already fused")
            return
        problem = None
        if type(block).forward is not self.diffusers.resnet.forward:
            problem = f"{type(block).__name__} overrides ResnetBlock2D.forward"
        elif not _is_plain_silu(block.nonlinearity):
            problem = f"nonlinearity {type(block.nonlinearity).__name__} is not nn.SiLU"
        elif block.time_embedding_norm not in ("default", "scale_shift"):
            problem = f"time_embedding_norm {block.time_embedding_norm!r} is not supported"
        elif block.time_embedding_norm == "scale_shift" and block.time_emb_proj is None:
            problem = "scale_shift without time_emb_proj"
        elif "forward" in block.__dict__:
            problem = "the instance already has its own forward"
        else:
            problem = _group_norm_problem(block.norm1) or _group_norm_problem(block.norm2)
        self.accounted_norms.update((id(block.norm1), id(block.norm2)))
        if problem:
            self._left(path, block, problem)
            return
        self._fuse_norm(block, "norm1", act=True)
        self._fuse_norm(block, "norm2", act=True)
        self._override(block, "forward", ResnetBlock2DForward(block))
        detail = "norm2 · (1 + scale) + shift" if block.time_embedding_norm == "scale_shift" else "norm2"
        self._replaced(path, block, f"norm1 + SiLU, {detail} + SiLU → group_norm_silu")

    def _patch_unet_head(self, path, unet):
        norm, act = unet.conv_norm_out, unet.conv_act
        here = _join(path, "conv_norm_out")
        if norm is None:
            return
        if isinstance(norm, GroupNormAct):
            self._already(here, norm, "conv_norm_out + conv_act already fused")
            return
        self.accounted_norms.add(id(norm))
        problem = _group_norm_problem(norm)
        if problem is None and not _is_plain_silu(act):
            problem = f"conv_act {type(act).__name__} is not nn.SiLU"
        if problem is None and type(unet).forward not in (cls.forward for cls in self.diffusers.unets):
            problem = f"{type(unet).__name__} overrides forward"
        if problem:
            self._left(here, norm, problem)
            return
        self._fuse_norm(unet, "conv_norm_out", act=True)
        self._swap(unet, "conv_act", nn.Identity())
        self._replaced(here, norm, "conv_norm_out + conv_act (SiLU) → group_norm_silu")

    def _report_other_norms(self):
        for path, module in self.root.named_modules():
            if isinstance(module, nn.GroupNorm) and id(module) not in self.accounted_norms:
                self.accounted_norms.add(id(module))
                self._left(path, module, "standalone GroupNorm outside the supported blocks "
                                         "(no SiLU after it in an nn.Sequential)")

    # -- attention -----------------------------------------------------------------------
    def _patch_gd_attention(self, path, block):
        attention = block.attention
        here = _join(path, "attention")
        if isinstance(attention, MultiHeadQKVAttention) and attention.backend == "triton":
            self._already(here, attention, "already runs qkv_attention")
            return
        channels = _gd_attention_width(block)
        if channels is None or channels % attention.n_heads:
            self._left(here, attention, f"head dim unknown ({type(block).__name__} without "
                                        "a width divisible by its heads)")
            return
        head_dim = channels // attention.n_heads
        if head_dim > TRITON_MAX_HEAD_DIM:
            self._left(here, attention, f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM} "
                                        "(the Triton kernel's limit)")
            return
        legacy = type(attention).__name__ == "QKVAttentionLegacy"
        cls = QKVAttentionLegacy if legacy else QKVAttention
        self._swap(block, "attention", cls(attention.n_heads, backend="triton"))
        self._replaced(here, attention, f"→ qkv_attention (heads={attention.n_heads}, head_dim={head_dim}, "
                                        f"{'legacy' if legacy else 'new'} order)")

    def _patch_diffusers_attention(self, path, attn):
        processor = attn.processor
        if isinstance(processor, FastdiffAttnProcessor):
            self._already(path, attn, "processor already runs fastdiff attention")
            return
        problem = None
        kind = "cross-attention" if attn.is_cross_attention else "self-attention"
        if type(processor) not in self.diffusers.processors:
            problem = (f"processor {type(processor).__name__} is not a default one "
                       "(AttnProcessor2_0, AttnProcessor)")
        elif attn.to_k is None or attn.to_v is None or attn.norm_q is not None or attn.norm_k is not None:
            problem = "attention without to_k/to_v or with q/k norms"
        elif attn.to_q.out_features != attn.to_k.out_features or attn.to_q.out_features % attn.heads:
            problem = "query and key widths differ or are not divisible by heads"
        else:
            head_dim = attn.to_q.out_features // attn.heads
            if head_dim > TRITON_MAX_HEAD_DIM:
                problem = f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM} (the Triton kernel's limit)"
        if problem:
            self._left(path, attn, f"{kind}: {problem}; keeps its own processor")
            return
        use_module_scale = not isinstance(processor, self.diffusers.processors[0])
        self.new_processors[attn] = FastdiffAttnProcessor(processor, use_module_scale)
        self.records.append(_ProcessorSwap(attn, processor))
        self._replaced(path, attn, f"{kind} processor {type(processor).__name__} → fastdiff attention "
                                   f"(heads={attn.heads}, head_dim={head_dim}; "
                                   "calls with a mask use the original)")


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _check_kernels(kernels):
    if isinstance(kernels, str):
        kernels = (kernels,)
    try:
        kernels = tuple(kernels)
    except TypeError:
        raise TypeError(f"kernels must be a sequence of names from {KERNELS}, got {kernels!r}") from None
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown or not kernels:
        raise ValueError(f"unknown kernels {unknown or kernels!r}; choose from {', '.join(KERNELS)}")
    return tuple(k for k in KERNELS if k in kernels)


def patch(model, kernels=KERNELS):
    """Swap fastdiff's kernels into ``model`` in place and return a :class:`PatchReport`.

    ``kernels``: any of ``"group_norm_silu"`` (GroupNorm, FiLM scale/shift and SiLU as one
    op) and ``"attention"`` (fused attention). Only this instance changes; parameters
    (the same objects), their order and state_dict keys are unchanged; modules that are
    not recognised are left as they are and listed in the report. Patching again is
    harmless (reported as already patched). :func:`unpatch` undoes it exactly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    kernels = _check_kernels(kernels)
    report, records = _Patcher(model, kernels).run()
    if records:
        model.__dict__.setdefault(_RECORDS_ATTR, []).extend(records)
    return report


def unpatch(model):
    """Undo every :func:`patch` applied to ``model`` or to any of its submodules: the
    original modules and attention processors go back (the same objects), instance-level
    forwards are removed. Returns the number of changes undone (0 when nothing was
    patched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch expects an nn.Module, got {type(model).__name__}")
    undone = 0
    roots = [m for m in model.modules() if m.__dict__.get(_RECORDS_ATTR)]
    for root in roots:
        records = root.__dict__.pop(_RECORDS_ATTR)
        for record in reversed(records):
            record.undo(root)
        undone += len(records)
    return undone
