"""components.sampling.generation: stop strings checked on the text of generated tokens, whatever tokens spell them.

A byte-level BPE tokenizer is trained here on agent-like lines that contain the tags, with Qwen2's pre-tokenizer
split, so `</search>` is several tokens and its last one depends on what follows (`>`, `>\\n`, `>\\n\\n`, `><`,
`></`). The helpers that build it and a model whose greedy decoding spells chosen token chains are shared with the
backend tests.
"""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from arborl.components.config import ModelConfig
from arborl.components.sampling import vllm_backend
from arborl.components.sampling.generation import StopStrings, cut_turn, token_pieces
from arborl.components.sampling.vllm_backend import VLLMBackend
from arborl.components.training.models import build_model

TAGS = ("</search>", "</answer>")
# Qwen2's pre-tokenizer split: punctuation runs take trailing newlines, so `>` merges with what follows it
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
WORDS = ("who what where when born city capital river mountain author wrote book film director married spouse "
         "founded company country language works lives north south old new the of in a is").split()


def _lines(n: int, seed: int = 0) -> list[str]:
    """Agent-like turns with the tags, in the layouts that make `>` merge differently."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        out.append(rng.choice([
            f"<think> {q} </think>\n<search> {q} </search>\n\n<information>Doc 1(Title: {a}) {q}</information>\n\n",
            f"<search>{q}</search><information>{a}</information>",
            f"<answer> {a} </answer>",
            f"<answer>{a}</answer></search>\n",
        ]))
    return out


@functools.cache
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary 400) trained on 300 agent-like lines; EOS `<|im_end|>`, pad
    `<|endoftext|>`. Shared (cached): do not modify it."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_lines(300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tiny_qwen2(tokenizer: PreTrainedTokenizerFast, seed: int = 0, tie: bool = True) -> Qwen2ForCausalLM:
    """A random Qwen2 (hidden 32, 2 layers, 2 heads, one kv head, q/k/v biases) over `tokenizer`'s vocabulary,
    with large weights so that greedy choices are not decided by float noise."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, (32 / p.shape[1]) ** 0.5)
    return model


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    """The pipeline's tiny Llama (`models.build_model`: hidden 32, 2 layers, 2 heads) over `tokenizer`, with the
    same large weights as `tiny_qwen2`."""
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, (32 / p.shape[1]) ** 0.5)
    return model.eval()


def chain_model(model: torch.nn.Module, chains: list[list[int]], strength: float = 4.0) -> torch.nn.Module:
    """Rewire a Llama-family causal LM in place so that greedy decoding follows `chains`: after token a = chain[k]
    comes b = chain[k + 1] (tokens distinct across all chains). Embeddings become unit normal and the layers'
    matrices small (std 0.02), so the last hidden state is mostly the current token's embedding (the layers still
    shift every logit a little); the LM head is untied, and row b gains `strength` times the direction of a's
    embedding. Returns the model."""
    with torch.no_grad():
        inner = model.model
        emb = inner.embed_tokens.weight  # (vocab, hidden)
        torch.manual_seed(7)
        emb.normal_(0.0, 1.0)
        for p in inner.layers.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
        head = torch.randn_like(emb) * 0.02
        for chain in chains:
            for a, b in zip(chain[:-1], chain[1:], strict=True):
                head[b] += strength * emb[a] / emb[a].norm()
        model.lm_head.weight = torch.nn.Parameter(head)
    return model.eval()


def spelled_tags(tokenizer: PreTrainedTokenizerFast) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(contexts, chains, ends) for `chain_model`: row i's context ends with chains[i][0], and greedy decoding then
    spells chains[i][1:]. Rows 0-2 spell a tag across tokens, completed at generated token ends[i] - 1: ` </`,
    `search`, `>\n\n` (the last token carries characters after the tag); the tag one byte a token; `</`, `answer`,
    `></`. Row 3 spells no tag (ends[i] = 0); the model's continuation after a chain (`r c h > D ...`) nearly
    does."""
    def ids(text: str) -> list[int]:
        return encode(tokenizer, text)

    contexts = [ids(f"<search> who {w}") for w in ("city", "river", "film", "author")]
    spelled = [ids(" </search>\n\n<information>")[:4], [ids(c)[0] for c in "</search>"] + ids("Doc")[:1],
               ids("a</answer></search>")[1:4] + ids("x</search><information>")[4:5], ids(" the book of")]
    chains = [[c[-1], *s] for c, s in zip(contexts, spelled, strict=True)]
    tokens = [t for chain in chains for t in chain]
    assert len(tokens) == len(set(tokens)) and len({c[-1] for c in contexts}) == len(contexts)
    return contexts, chains, [3, 9, 3, 0]


# --- the tokenizer -------------------------------------------------------------------------------------------


def test_closing_tags_are_several_tokens_split_by_context():
    tok = bpe_tokenizer()
    for tag in TAGS:
        assert len(encode(tok, tag)) > 1
    splits = set()
    for text in ("</search>", " </search>\n\n<information>", "x</search><information>", "a</answer></search>\n"):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.index("</search>")
        end = start + len("</search>")
        splits.add(tuple(text[a:b] for a, b in enc["offset_mapping"] if a < end and b > start))
    assert len(splits) >= 3  # the tokens that spell the tag depend on its neighbours
    assert any(not s[-1].endswith(">") for s in splits)  # ... and its last token may carry characters after it


def test_token_pieces_decode_each_id_alone_and_are_cached():
    tok = bpe_tokenizer()
    pieces = token_pieces(tok)
    assert len(pieces) == len(tok)
    assert pieces == [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                      for i in range(len(tok))]
    assert pieces[tok.eos_token_id] == "<|im_end|>"  # special tokens are kept
    assert token_pieces(tok) is pieces


def test_token_pieces_without_a_rust_backend_and_after_the_vocabulary_grows():
    base = bpe_tokenizer()

    class Slow:
        """A tokenizer with `decode` only."""

        def __len__(self) -> int:
            return len(base)

        def decode(self, ids: list[int], **kwargs) -> str:
            return base.decode(ids, **kwargs)

    assert token_pieces(Slow()) == token_pieces(base)
    grown = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
                                    eos_token="<|im_end|>")
    before = token_pieces(grown)
    grown.add_tokens(["<tool>"])
    after = token_pieces(grown)
    assert len(after) == len(before) + 1 and after[-1] == "<tool>"


def test_token_pieces_of_the_word_level_world_tokenizer(tokenizer):
    """The synthetic world's tags are single tokens: each stops a turn by itself."""
    stops = StopStrings.from_tokenizer(TAGS, tokenizer)
    for tag in TAGS:
        assert stops.find([tokenizer.convert_tokens_to_ids(tag)]) == 0


# --- StopStrings -----------------------------------------------------------------------------------------------


def _segmentations(text: str, vocab: dict[str, int]) -> list[list[int]]:
    """Every way to spell `text` as a sequence of vocabulary tokens."""
    ways: list[list[list[int]]] = [[] for _ in range(len(text) + 1)]
    ways[0] = [[]]
    for end in range(1, len(text) + 1):
        for start in range(end):
            if text[start:end] in vocab:
                ways[end] += [w + [vocab[text[start:end]]] for w in ways[start]]
    return ways[-1]


def test_stop_strings_find_the_tag_however_it_is_split():
    """Every spelling of ` </search>\\n\\n` in the vocabulary (tokens may carry characters before or after the
    tag) stops at the token that holds the tag's last character, after any prefix."""
    tok = bpe_tokenizer()
    pieces = token_pieces(tok)
    vocab = {p: i for i, p in enumerate(pieces) if p}
    stops = StopStrings(TAGS, pieces)
    window = " </search>\n\n"
    last = window.index(">")
    spellings = _segmentations(window, vocab)
    assert len(spellings) > 50
    prefix = encode(tok, "<search> who wrote the book")
    carrying = 0
    for ids in spellings:
        ends = [len("".join(pieces[t] for t in ids[: n + 1])) for n in range(len(ids))]
        completing = next(n for n, e in enumerate(ends) if e > last)
        carrying += ends[completing] > last + 1
        assert stops.find(ids) == completing
        assert stops.find(prefix + ids + prefix) == len(prefix) + completing
    assert carrying > 0


def test_stop_strings_agree_with_searching_the_decoded_text():
    """Random token sequences over the pieces of both tags and of multi-byte characters (decoded alone, their
    partial bytes are replacement characters): the first token after which the decoded text contains a tag, found
    by decoding every prefix."""
    tok = bpe_tokenizer()
    pieces = token_pieces(tok)
    stops = StopStrings(TAGS, pieces)
    texts = ("</search>\n\n", "x</answer></search>\n", "<answer> a </answer>", "sear ch>", "é</search>", "…</")
    parts = sorted({t for text in texts for t in encode(tok, text)}
                   | {t for c in "</searchnw> \n" for t in encode(tok, c)})
    assert any("\ufffd" in pieces[t] for t in parts)
    rng = random.Random(0)
    hits = 0
    for _ in range(400):
        ids = [rng.choice(parts) for _ in range(rng.randint(1, 30))]
        want = next((n for n in range(len(ids)) if any(t in tok.decode(ids[: n + 1]) for t in TAGS)), None)
        assert stops.find(ids) == want
        hits += want is not None
    assert 0 < hits < 400


def test_stop_strings_keep_a_short_tail_and_miss_near_misses():
    pieces = ["<", "/", "search", ">", "</", "sear", "ch", " ", "x", "</search>", "h>", "", "search>", "a", "b"]
    stops = StopStrings(("</search>", "ab"), pieces)
    assert stops.keep == len("</search>") - 1
    tail, hit = "", False
    for t in [0, 1, 2]:  # "</search" in three tokens
        tail, hit = stops.advance(tail, t)
        assert not hit and len(tail) <= stops.keep
    assert stops.advance(tail, 3)[1]  # ">" completes it across the carried tail
    assert stops.find([4, 5, 6, 7, 3]) is None  # "</search >"
    assert stops.find([4, 5, 8, 10]) is None  # "</searxh>"
    assert stops.find([4, 5, 11, 6, 3]) == 4  # an empty piece in between
    assert stops.find([9]) == 0 and stops.find([8, 4, 12]) == 2
    assert stops.find([8, 4, 12, 99]) == 2 and stops.find([99, 4, 2, 3]) == 3  # ids past `pieces` are empty text
    assert stops.find([8, 13, 14]) == 2
    tail, hit = stops.advance(stops.advance("", 13)[0], 14)
    assert hit and not stops.advance(tail, 8)[1]  # a hit is reported by the token it ends in, not again after
    with pytest.raises(ValueError, match="empty"):
        StopStrings(("</search>", ""), pieces)
    assert StopStrings((), pieces).find(range(len(pieces))) is None


def test_cut_turn_cuts_at_the_token_that_completes_a_stop_string():
    tok = bpe_tokenizer()
    stops = StopStrings.from_tokenizer(TAGS, tok)
    ids = encode(tok, " who wrote it </search>\n\n<information>Doc 1")
    completing = next(n for n in range(len(ids)) if "</search>" in tok.decode(ids[: n + 1]))
    assert tok.decode([ids[completing]]) == ">\n\n"  # the completing token carries characters after the tag
    out = cut_turn(ids, set(), tok.eos_token_id, stops)
    assert (out.tokens, out.stop) == (ids[: completing + 1], "stop")
    assert cut_turn(ids, set(), tok.eos_token_id).stop == "length"  # no stop strings: the old contract
    assert cut_turn(ids, {ids[2]}, tok.eos_token_id, stops).tokens == ids[:3]  # an earlier stop token wins
    eos = ids[:2] + [tok.eos_token_id] + ids[2:]
    out = cut_turn(eos, set(), tok.eos_token_id, stops)
    assert (out.tokens, out.stop) == (ids[:2] + [tok.eos_token_id], "eos")
    # only the turn's tokens count: a tag begun in the context is not completed by the turn
    assert tok.decode(ids[completing - 2: completing + 1]) == " </search>\n\n"
    assert cut_turn(ids[completing - 1:], set(), tok.eos_token_id, stops).stop == "length"


# --- vLLM, faked -----------------------------------------------------------------------------------------------


class _Params:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _FakeLLM:
    """Answers each request with fixed tokens (more than a stop string would keep, to check the cut)."""

    def __init__(self, replies: list[tuple[list[int], str, object]]):
        self.replies = replies
        self.params: list[_Params] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.params += params
        out = []
        for (tokens, finish, reason), prompt in zip(self.replies, prompts, strict=True):
            logprobs = [{t: SimpleNamespace(logprob=-0.1 * (k + 1))} for k, t in enumerate(tokens)]
            completion = SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=finish, stop_reason=reason)
            out.append(SimpleNamespace(outputs=[completion], num_cached_tokens=len(prompt["prompt_token_ids"]) - 2))
        return out


def test_vllm_backend_passes_stop_strings_and_cuts_at_the_completing_token(monkeypatch):
    tok = bpe_tokenizer()
    monkeypatch.setattr(vllm_backend, "_vllm", lambda: SimpleNamespace(SamplingParams=_Params))
    stops = StopStrings.from_tokenizer(TAGS, tok)
    turn = encode(tok, " a </search>\n\n<information>")
    end = next(n for n in range(len(turn)) if "</search>" in tok.decode(turn[: n + 1])) + 1
    answer = encode(tok, " b </answer>")
    eos = tok.eos_token_id
    replies = [
        (turn, "stop", "</search>"),  # extra tokens after the completing one are cut
        (turn[:end], "length", None),  # the cap and the tag on the same token: a stop
        (answer[:-1] + [eos], "stop", None),  # EOS
        (answer[:2], "length", None),
    ]
    llm = _FakeLLM(replies)
    backend = VLLMBackend(llm, tok.pad_token_id, eos)
    contexts = [[5, 6, 7], [5, 6, 7, 8], [9, 9, 9], [4, 4]]
    outs = backend.generate(contexts, [len(r[0]) for r in replies], set(), 0.7, stop_strings=stops)
    assert [(o.tokens, o.stop) for o in outs] == [(turn[:end], "stop"), (turn[:end], "stop"),
                                                  (answer[:-1] + [eos], "eos"), (answer[:2], "length")]
    assert outs[0].logprobs == pytest.approx([-0.1 * (k + 1) for k in range(end)])
    assert [o.prefilled for o in outs] == [2, 2, 2, 2]  # context length minus vLLM's cached tokens
    for p in llm.params:
        assert p.kwargs["stop"] == list(TAGS)
        assert p.kwargs["include_stop_str_in_output"] and p.kwargs["detokenize"]

    llm = _FakeLLM([(turn, "length", None)])
    out = VLLMBackend(llm, tok.pad_token_id, eos).generate([[5, 6, 7]], [len(turn)], set())[0]
    assert (out.tokens, out.stop) == (turn, "length")  # without stop strings: vLLM's tokens as they are
    assert "stop" not in llm.params[0].kwargs and not llm.params[0].kwargs["detokenize"]
