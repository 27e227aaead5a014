"""Tiny user-model factories for the tracing and profiling tests (``tests.fixtures_models:<name>``).

Each factory follows the user-model convention of :mod:`graphs.build`: no arguments, returns ``(model,
example_inputs)`` or ``(model, example_inputs, loss_fn)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

MLP_BATCH, MLP_IN, MLP_HIDDEN, MLP_OUT = 4, 8, 16, 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(MLP_IN, MLP_HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(MLP_HIDDEN, MLP_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp() -> tuple[nn.Module, tuple[Tensor]]:
    """2-layer MLP, batch 4, 8 → 16 → 3; the loss is the default ``output.mean()``."""
    return MLP(), (torch.randn(MLP_BATCH, MLP_IN),)


def mlp_squared_loss() -> tuple[nn.Module, tuple[Tensor], object]:
    """The MLP with an explicit loss function (three-tuple form)."""
    return MLP(), (torch.randn(MLP_BATCH, MLP_IN),), lambda out: (out ** 2).sum()


class UnrolledLSTM(nn.Module):
    """``layers`` LSTMCells unrolled over ``steps`` time steps, then a shared Linear head per step."""

    def __init__(self, width: int, layers: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.cells = nn.ModuleList(nn.LSTMCell(width, width) for _ in range(layers))
        self.head = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        states: list[tuple[Tensor, Tensor] | None] = [None] * len(self.cells)
        total = None
        for t in range(self.steps):
            h = x[:, t]
            for layer, cell in enumerate(self.cells):
                state = states[layer]
                h, c = cell(h) if state is None else cell(h, state)
                states[layer] = (h, c)
            y = self.head(h).pow(2).mean()
            total = y if total is None else total + y
        return total


def lstm(width: int = 16, layers: int = 2, steps: int = 3, batch: int = 4) -> tuple[nn.Module, tuple[Tensor]]:
    """A small unrolled LSTM: ``layers × steps`` LSTMCell calls (output is already the scalar loss)."""
    return UnrolledLSTM(width, layers, steps), (torch.randn(batch, steps, width),)


def lstm_heavy() -> tuple[nn.Module, tuple[Tensor]]:
    """An LSTMCell-dominated step (~tens of ms on one core) for the backward-coverage check."""
    return lstm(width=256, layers=2, steps=6, batch=64)


class TiedWeights(nn.Module):
    """A parameter read through ``get_attr`` by functional ops, and a module shared by two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x * self.scale)
        return self.fc(F.relu(y)) + self.scale


def tied() -> tuple[nn.Module, tuple[Tensor]]:
    return TiedWeights(), (torch.randn(2, 8),)


class ShapeBranch(nn.Module):
    """fx cannot trace ``if x.shape[0] > 2`` (a Proxy in control flow); torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > 2:
            x = x * 2
        return self.fc(x)


def shape_branch() -> tuple[nn.Module, tuple[Tensor]]:
    return ShapeBranch(), (torch.randn(3, 4),)


class DataBranch(nn.Module):
    """Control flow on tensor *values*: neither fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def untraceable() -> tuple[nn.Module, tuple[Tensor]]:
    return DataBranch(), (torch.randn(3, 4),)


class KeptWhole(nn.Module):
    """A traceable model holding a module fx cannot trace inside (control flow on tensor values)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = DataBranch()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(torch.relu(self.pre(x))).sum(-1)


def kept_whole() -> tuple[nn.Module, tuple[Tensor]]:
    return KeptWhole(), (torch.randn(4, 4),)


class InplaceBN(nn.Module):
    """In-place ReLU, an in-place add and BatchNorm running statistics: profiling must not change them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn(self.conv(x)))
        y += 1.0
        return y


def inplace_bn() -> tuple[nn.Module, tuple[Tensor]]:
    return InplaceBN(), (torch.randn(2, 3, 8, 8),)


class Sized(nn.Module):
    """Integer ops (``x.shape[0]``) next to tensor views of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        y = self.fc(x).reshape(n, 2, 2)
        return y[:, 0] * 2


def sized() -> tuple[nn.Module, tuple[Tensor], object]:
    """``Sized`` with the mean of its output as the loss (the op list the profiling tests name)."""
    return Sized(), (torch.randn(3, 4),), lambda out: out.mean()


def returns_model_only() -> nn.Module:
    """A broken factory: wrong return shape."""
    return MLP()


def raises() -> tuple[nn.Module, tuple[Tensor]]:
    raise RuntimeError("factory exploded")


class _ListInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, idx: list) -> Tensor:
        return self.emb(torch.tensor(idx)).sum()


def list_input() -> tuple[nn.Module, tuple[list]]:
    """Token ids as a Python list: fx takes it as a constant (a Python value input); torch.export flattens the
    list into placeholders."""
    return _ListInput(), ([1, 2, 3, 4],)


class _NoGradLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.head(x)


def no_grad_layer() -> tuple[nn.Module, tuple[Tensor]]:
    """A layer frozen by ``torch.no_grad()`` inside ``forward`` (fx's trace drops the block)."""
    return _NoGradLayer(), (torch.randn(8, 4),)


def exits() -> tuple[nn.Module, tuple[Tensor]]:
    """A factory that ends the process (a script's ``sys.exit`` reached through its import or its call)."""
    import sys

    sys.exit(3)


NOT_CALLABLE = 42


# ---------------------------------------------------------------------------------------------- transformers (#18)

LM_VOCAB, LM_WIDTH, LM_LAYERS, LM_BATCH, LM_SEQ = 100, 32, 4, 8, 12


class EncoderLM(nn.Module):
    """A language model on ``nn.TransformerEncoder``: token embedding, ``layers`` encoder layers, vocabulary
    projection. fx's own leaf rule made the whole encoder one op."""

    def __init__(self, vocab: int = LM_VOCAB, width: int = LM_WIDTH, layers: int = LM_LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = self.head(self.encoder(self.embed(tokens)))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _next_tokens(vocab: int, batch: int, seq: int) -> tuple[Tensor, Tensor]:
    """Random token sequences and their next tokens (targets are an input: a loss closing over the whole
    batch's targets could not be split into micro-batches)."""
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def encoder_lm() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The encoder LM on random tokens; the model returns its next-token cross-entropy."""
    return EncoderLM(), _next_tokens(LM_VOCAB, LM_BATCH, LM_SEQ)


class Seq2SeqTransformer(nn.Module):
    """``nn.Transformer`` (encoder-decoder, batch first) on float sequences: its output ends in LayerNorm."""

    def __init__(self, width: int = LM_WIDTH) -> None:
        super().__init__()
        self.net = nn.Transformer(width, 4, 2, 2, 2 * width, dropout=0.0, batch_first=True)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.net(src, tgt)


def nn_transformer() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """``nn.Transformer`` with the default loss (its mean output is ~0: LayerNorm)."""
    return Seq2SeqTransformer(), (torch.randn(LM_BATCH, 10, LM_WIDTH), torch.randn(LM_BATCH, 6, LM_WIDTH))


HARD_BATCH = 4


class HardCodedBatch(nn.Module):
    """Reshapes with the example's batch size written in: runs on a smaller batch, but mixes its samples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x).view(HARD_BATCH, -1)  # (B, 2, 8) → (4, 16 B / 4): rows are samples only when B == 4
        return y.pow(2).mean()


def hard_coded_batch() -> tuple[nn.Module, tuple[Tensor]]:
    return HardCodedBatch(), (torch.randn(HARD_BATCH, 2, 8),)


class Pairs(nn.Module):
    """Adds each sample to its neighbour through a reshape: micro-batches of one sample cannot compute it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return y.reshape(2, -1, 8).sum(0).pow(2).mean()


def pairs() -> tuple[nn.Module, tuple[Tensor]]:
    return Pairs(), (torch.randn(4, 8),)


# ---------------------------------------------------------------------------------------------- Hugging Face

HF_VOCAB, HF_WIDTH, HF_LAYERS, HF_BATCH, HF_SEQ = 1000, 64, 2, 8, 16


class CausalLMStep(nn.Module):
    """A Hugging Face model (``lm``) and its cross-entropy on ``targets``: one logit row per target token."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = self.lm(tokens).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _hf_lm(model: nn.Module) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """A model built from a config (no weights, nothing downloaded), in training mode, on random tokens."""
    model.train()
    return CausalLMStep(model), _next_tokens(HF_VOCAB, HF_BATCH, HF_SEQ)


def hf_gpt2() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Hugging Face GPT-2 from a tiny config (2 layers, 64 wide, vocabulary 1,000)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=HF_VOCAB, n_positions=64, n_embd=HF_WIDTH, n_layer=HF_LAYERS, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return _hf_lm(GPT2LMHeadModel(cfg))


def hf_llama() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Hugging Face Llama from a tiny config (2 layers, 64 wide, vocabulary 1,000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=HF_WIDTH, intermediate_size=2 * HF_WIDTH,
                      num_hidden_layers=HF_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, use_cache=False)
    return _hf_lm(LlamaForCausalLM(cfg))


def hf_bert() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Hugging Face BERT (masked-LM head) from a tiny config; cross-entropy on every position."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=HF_VOCAB, hidden_size=HF_WIDTH, num_hidden_layers=HF_LAYERS, num_attention_heads=4,
                     intermediate_size=2 * HF_WIDTH, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _hf_lm(BertForMaskedLM(cfg))


class Seq2SeqStep(nn.Module):
    """``model(**batch).loss``, as Hugging Face's Trainer calls a model (an encoder-decoder, or with labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.train()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(**batch).loss


def _seq2seq(model: nn.Module) -> tuple[nn.Module, tuple[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return Seq2SeqStep(model), ({"input_ids": torch.randint(0, HF_VOCAB, (HF_BATCH, HF_SEQ), generator=g),
                                 "labels": torch.randint(0, HF_VOCAB, (HF_BATCH, HF_SEQ // 2), generator=g)},)


def hf_bart() -> tuple[nn.Module, tuple[dict[str, Tensor]]]:
    """Hugging Face BART from a tiny config: export's graph has views that hold only for the traced strides."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=HF_VOCAB, d_model=HF_WIDTH, encoder_layers=HF_LAYERS, decoder_layers=HF_LAYERS,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * HF_WIDTH,
                     decoder_ffn_dim=2 * HF_WIDTH, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                     use_cache=False)
    return _seq2seq(BartForConditionalGeneration(cfg))


def hf_t5() -> tuple[nn.Module, tuple[dict[str, Tensor]]]:
    """Hugging Face T5 from a tiny config (relative position bias; its exported step failed on its own batch)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=HF_VOCAB, d_model=HF_WIDTH, d_ff=2 * HF_WIDTH, num_layers=HF_LAYERS, num_heads=4,
                   d_kv=16, dropout_rate=0.0, decoder_start_token_id=0, use_cache=False)
    return _seq2seq(T5ForConditionalGeneration(cfg))


def hf_qwen2_moe() -> tuple[nn.Module, tuple[dict[str, Tensor]]]:
    """Hugging Face Qwen2-MoE from a tiny config (4 experts, top 2, a shared expert), ``model(**batch).loss``:
    fx keeps its experts whole (a loop over the experts hit), torch.export traces them."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=HF_VOCAB, hidden_size=HF_WIDTH, intermediate_size=2 * HF_WIDTH,
                         moe_intermediate_size=HF_WIDTH, shared_expert_intermediate_size=HF_WIDTH,
                         num_hidden_layers=HF_LAYERS, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, HF_VOCAB, (HF_BATCH, HF_SEQ), generator=g)
    return Seq2SeqStep(Qwen2MoeForCausalLM(cfg)), ({"input_ids": ids, "labels": ids},)
