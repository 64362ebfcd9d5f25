// qlora-rt in the browser: a qlora-rt decoder export (model.onnx, its adapters, tokenizer files) run by
// onnxruntime-web on the page's own GPU (WebGPU) or CPU (wasm). No server computes anything; adapters are switched
// per request without reloading the base: an adapter's tensors are fed as the graph's LoRA inputs (on WebGPU
// uploaded to the GPU once), so that on WebGPU the KV cache stays on the GPU from step to step.
//
//   import { Model } from "./qlora-rt.mjs";
//   const model = await Model.load("./model/");
//   for await (const piece of model.stream("Rewrite 5 March 2021 as ISO 8601", { chat: true, adapter: "default" }))
//     out.textContent += piece.text;
//   const { text, tokens } = await model.generate("Hello", { maxNewTokens: 32 });    // greedy, the base
//
// The imports are bare names: the page maps them to files (`qlora-rt web` writes that import map).
// onnxruntime-web comes in two builds, loaded when a model is: "onnxruntime-web" (wasm, the CPU) and
// "onnxruntime-web/webgpu" (WebGPU, with the CPU for what WebGPU does not run).
//
// The decode loop mirrors qlora_rt/runtime/decode.py, the Python runtime's one decode core: the same feeds
// (FEEDS, feedValues: the prompt in chunks of PREFILL_CHUNK from position 0, then a token a run; see FEEDS for
// the two onnxruntime-web cannot take) and the same step (Reply.take: logit bias and penalties, greedy or seeded
// sampling, end of text, stop strings, length, the text a token adds).
// A fix to one is a fix to both (tests/test_web.py runs them side by side). Not here: logprobs and JSON
// constraints (the server's), and the seeded sampler's generator (mulberry32, not numpy's).
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";

// The graph's input, output and dimension names: the same as qlora_rt/runtime/graph_io.py (a test compares).
export const IO = {
  "input_ids": "input_ids",
  "attention_mask": "attention_mask",
  "position_ids": "position_ids",
  "logits": "logits",
  "logits_to_keep": "logits_to_keep",
  "past_key": "past_key_values.%d.key",
  "past_value": "past_key_values.%d.value",
  "present_key": "present.%d.key",
  "present_value": "present.%d.value"
};
// What every run feeds besides the cache (decode.py's FEEDS), where the session takes them: row_lengths and
// logits_to_keep are inputs with defaults (initializers), which onnxruntime-web does not let a run feed ("invalid
// input"), so the page feeds the other three. For its one row that is the same run: without row_lengths the
// graph counts the row's cache from its mask, all ones; without logits_to_keep every position's logits come
// back and the last is read.
export const FEEDS = ["input_ids", "attention_mask", "position_ids", "row_lengths", "logits_to_keep"];
export const PREFILL_CHUNK = 64;  // prompt positions a run (decode.py's): a prompt's chunks start at multiples of it
const MANIFEST = "qlora_rt_export.json", FORMAT = "qlora-rt-onnx", KV_CACHE = "in-place";
const ADAPTER_SUFFIX = ".onnx_adapter";

/** One error type with one line that says what is wrong and what to do. */
export class QloraError extends Error {
  constructor(message) { super(message); this.name = "QloraError"; }
}

async function fetchOk(url, what, fetchFn) {
  let response;
  try {
    response = await fetchFn(url);
  } catch (e) {
    throw new QloraError(`${url}: cannot fetch ${what} (${e.message})`);
  }
  if (!response.ok) throw new QloraError(`${url}: ${response.status} ${response.statusText} (${what})`);
  return response;
}

/** The browser's WebGPU adapter, or null. */
async function gpuAdapter() {
  try {
    return (await globalThis.navigator?.gpu?.requestAdapter()) ?? null;
  } catch {
    return null;
  }
}

/**
 * "webgpu" where the browser offers a WebGPU adapter that can run the export, else "wasm". needF16: the export
 * computes in fp16 (its KV cache), which a WebGPU adapter runs only with the "shader-f16" feature.
 */
export async function bestDevice(needF16 = false) {
  const adapter = await gpuAdapter();
  return adapter && (!needF16 || adapter.features.has("shader-f16")) ? "webgpu" : "wasm";
}

/** The onnxruntime-web build for a device ("wasm" or "webgpu"), imported once. */
export async function runtime(device) {
  if (device === "webgpu") return import("onnxruntime-web/webgpu");
  if (device === "wasm") return import("onnxruntime-web");
  throw new QloraError(`device must be "auto", "webgpu" or "wasm", got ${JSON.stringify(device)}`);
}

/** A seeded generator of floats in [0, 1) (mulberry32): the same seed gives the same sampled tokens. */
function randomFrom(seed) {
  let a = (seed ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The tensors of an .onnx_adapter file (onnxruntime's adapter format: a FlatBuffer, file identifier "TORT", root
 * table Adapter {format_version, adapter_version, model_version, parameters: [Parameter {name, dims: [int64],
 * data_type, raw_data: [uint8]}]}, onnxruntime/lora/adapter_format/adapter_schema.fbs). Returns
 * { modelVersion, params: Map(name -> { dims, data: Float32Array }) }; float32 tensors only (what the exporter
 * writes). Every offset is read through a DataView, so a damaged file throws, never reads past its end.
 */
export function readAdapter(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u32 = (at) => view.getUint32(at, true);
  const ref = (at) => at + u32(at);  // a uoffset: relative to where it is stored
  const table = (at) => {  // field i's position in the table at `at`, or 0 where the field is absent
    const vtable = at - view.getInt32(at, true), size = view.getUint16(vtable, true);
    return (i) => (4 + 2 * i < size && view.getUint16(vtable + 4 + 2 * i, true) ? at + view.getUint16(vtable + 4 + 2 * i, true) : 0);
  };
  const vector = (at) => { const start = ref(at); return [start + 4, u32(start)]; };  // [first element, length]
  const utf8 = new TextDecoder("utf-8", { fatal: true });
  if (bytes.byteLength < 8 || utf8.decode(bytes.subarray(4, 8)) !== "TORT") throw new Error("no TORT file identifier");
  const root = table(ref(0));
  const params = new Map();
  const [first, count] = root(3) ? vector(root(3)) : [0, 0];
  for (let i = 0; i < count; i++) {
    const p = table(ref(first + 4 * i));
    if (!p(0) || !p(3)) throw new Error(`parameter ${i} has no name or no data`);
    const [nameAt, nameLength] = vector(p(0));
    if (nameAt + nameLength > bytes.byteLength) throw new RangeError("a name runs past the end of the file");
    const name = utf8.decode(bytes.subarray(nameAt, nameAt + nameLength));
    const [dimsAt, rank] = p(1) ? vector(p(1)) : [0, 0];
    if (rank !== 2) throw new Error(`${name}: ${rank} dimensions, not 2 (a LoRA matrix)`);
    const dims = Array.from({ length: rank }, (_, k) => Number(view.getBigInt64(dimsAt + 8 * k, true)));
    const type = p(2) ? view.getInt32(p(2), true) : 0;
    if (type !== 1) throw new Error(`${name}: data type ${type}, not float32 (1)`);
    const [dataAt, size] = vector(p(3));
    if (size !== 4 * dims.reduce((a, b) => a * b, 1) || dataAt + size > bytes.byteLength)
      throw new Error(`${name}: ${size} bytes of data for dims [${dims}]`);
    params.set(name, { dims, data: new Float32Array(bytes.slice(dataAt, dataAt + size).buffer) });
  }
  return { modelVersion: root(2) ? view.getInt32(root(2), true) : 0, params };
}

/**
 * One token from a row of logits: greedy at temperature 0, else softmax(z / T) cut to top_k, then to the smallest
 * set of the most likely tokens whose mass reaches top_p, sampled. No whole-vocabulary sort: top_k's cut comes from
 * a partial selection, and top_p sorts only the tokens above a weight whose set already holds top_p of the mass.
 */
export function pick(logits, { temperature = 0, topK = 0, topP = 1 } = {}, random = Math.random) {
  const n = logits.length;
  let best = 0;
  for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
  if (temperature === 0) return best;
  const w = new Float64Array(n);  // each token's weight, exp((z - max) / T): the best one's is 1
  for (let i = 0; i < n; i++) w[i] = Math.exp((logits[i] - logits[best]) / temperature);
  const byWeight = (ids) => ids.sort((i, j) => w[j] - w[i] || i - j);
  const sum = (ids) => ids.reduce((s, i) => s + w[i], 0);
  let kept = null;  // the candidates, most likely first; null: every token
  if (topK > 0 && topK < n) kept = byWeight(above(w, kthLargest(w, topK))).slice(0, topK);
  if (topP < 1) {
    const pool = kept ?? Array.from(w.keys()), goal = topP * sum(pool);
    let head = [];
    for (let floor = 2 ** -10; ; floor /= 64) {  // the tokens above `floor` suffice once they hold top_p of the mass
      head = floor > 1e-300 ? pool.filter((i) => w[i] >= floor) : pool;
      if (sum(head) >= goal || head.length === pool.length) break;
    }
    let mass = 0, keep = 0;
    byWeight(head);
    while (keep < head.length && mass < goal) mass += w[head[keep++]];
    kept = head.slice(0, keep);
  }
  const ids = kept ?? Array.from(w.keys());
  let r = random() * sum(ids);
  for (const i of ids) {
    r -= w[i];
    if (r <= 0) return i;
  }
  return ids[ids.length - 1];
}

/** The indices whose value is at least `floor`. */
function above(values, floor) {
  const out = [];
  for (let i = 0; i < values.length; i++) if (values[i] >= floor) out.push(i);
  return out;
}

/** The k-th largest of `values` (quickselect on a copy: linear on average, no sort). */
function kthLargest(values, k) {
  const a = Float64Array.from(values);
  let lo = 0, hi = a.length - 1, target = k - 1;
  while (lo < hi) {
    const pivot = a[(lo + hi) >> 1];
    let i = lo, j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) { [a[i], a[j]] = [a[j], a[i]]; i++; j--; }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else break;
  }
  return a[target];
}

/**
 * A reply's text as its tokens arrive, decoded incrementally (qlora_rt/runtime/text.py's Text): each token
 * decodes a window from the previous token boundary, not the whole reply, and stop strings are looked for only
 * where the new text could complete one.
 */
class Text {
  constructor(decode, stops) {
    Object.assign(this, { decode, stops: stops.filter(Boolean), tokens: [], done: "", pending: "", prefix: 0, read: 0 });
    this.longest = Math.max(0, ...this.stops.map((s) => s.length));
  }

  get text() { return this.done + this.pending; }

  /** Take one token; true when the text now holds a stop string (the text is then cut before it). */
  add(token) {
    const before = this.text.length;
    this.tokens.push(token);
    const head = this.decode(this.tokens.slice(this.prefix, this.read));
    const tail = this.decode(this.tokens.slice(this.prefix));
    if (tail.startsWith(head)) {
      this.pending = tail.slice(head.length);
    } else {  // the new token changed how earlier ones decode: decode it all again, once
      Object.assign(this, { done: "", prefix: 0, read: 0, pending: this.decode(this.tokens) });
    }
    if (!this.pending.endsWith("\ufffd")) {  // whole characters: the next window starts here
      if (this.pending) this.prefix = this.read;
      Object.assign(this, { done: this.done + this.pending, pending: "", read: this.tokens.length });
    }
    const text = this.text, start = Math.max(0, before - this.longest + 1);
    let cut = -1;
    for (const s of this.stops) {
      const at = text.indexOf(s, start);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut < 0) return false;
    Object.assign(this, { done: text.slice(0, cut), pending: "" });
    return true;
  }
}

/** How many trailing characters of text could start a stop string (held back from a stream until known). */
function heldBack(text, stops) {
  let k = 0;
  for (const s of stops) for (let j = 1; j < s.length; j++) if (text.endsWith(s.slice(0, j))) k = Math.max(k, j);
  return k;
}

function checkSampling({ temperature = 0, topK = 0, topP = 1, maxNewTokens = 128, presencePenalty = 0,
                        frequencyPenalty = 0, logitBias = null }, vocab) {
  if (!(temperature >= 0) || !Number.isFinite(temperature))
    throw new QloraError(`temperature must be >= 0 (0 = greedy), got ${temperature}`);
  if (!(topP > 0 && topP <= 1)) throw new QloraError(`topP must be in (0, 1], got ${topP}`);
  if (!(Number.isInteger(topK) && topK >= 0)) throw new QloraError(`topK must be an integer >= 0 (0 = off), got ${topK}`);
  if (!(Number.isInteger(maxNewTokens) && maxNewTokens >= 1))
    throw new QloraError(`maxNewTokens must be an integer >= 1, got ${maxNewTokens}`);
  for (const [name, v] of [["presencePenalty", presencePenalty], ["frequencyPenalty", frequencyPenalty]])
    if (!(v >= -2 && v <= 2)) throw new QloraError(`${name} must be in [-2, 2], got ${v}`);
  for (const [t, b] of Object.entries(logitBias ?? {})) {
    if (!(b >= -100 && b <= 100)) throw new QloraError("logitBias: each bias must be in [-100, 100]");
    if (!(Number.isInteger(Number(t)) && t >= 0 && t < vocab)) throw new QloraError(`logitBias: token ids must be in [0, ${vocab})`);
  }
}

/**
 * The values of one run's feeds (decode.py's `feeds`, for one row): `ids` go to the end of the row's cache, which
 * then holds `length` positions; keep: logits of the last `keep` positions (0: all). { name: [values, dims] }.
 */
export function feedValues(ids, length, keep = 1) {
  const t = ids.length;
  return {
    [IO.input_ids]: [ids, [1, t]],
    [IO.attention_mask]: [new Array(length).fill(1), [1, length]],
    [IO.position_ids]: [ids.map((_, k) => length - t + k), [1, t]],
    row_lengths: [[length], [1]],
    [IO.logits_to_keep]: [[keep], []],
  };
}

/**
 * The positions a run of an n-token prompt takes (decode.py's prompt_chunk): `chunk`, or the whole prompt where it
 * passes a LongRoPE export's switch length (the long tables apply to a run's positions only when they run together).
 */
export function promptChunk(meta, n, chunk = PREFILL_CHUNK) {
  return meta.long_rope_from && n > meta.long_rope_from ? n : chunk;
}

/** A prompt's runs from position `start` (decode.py's prompt_chunks): [end, tokens] each. */
export function promptChunks(ids, start = 0, chunk = PREFILL_CHUNK) {
  const out = [];
  for (let k = start; k < ids.length; k += chunk) out.push([Math.min(k + chunk, ids.length), ids.slice(k, k + chunk)]);
  return out;
}

/**
 * A row's logits with OpenAI's logit bias added and, for each token already generated, the presence penalty
 * subtracted once and the frequency penalty once per time (sampling.py's Sampling.adjust): a copy, or the row.
 */
export function adjust(logits, generated, { presencePenalty = 0, frequencyPenalty = 0, logitBias = null } = {}) {
  const bias = Object.entries(logitBias ?? {});
  if (!presencePenalty && !frequencyPenalty && !bias.length) return logits;
  const z = Float32Array.from(logits);
  for (const [t, b] of bias) z[Number(t)] += b;
  if (presencePenalty || frequencyPenalty) {
    const counts = new Map();
    for (const t of generated) counts.set(t, (counts.get(t) ?? 0) + 1);
    for (const [t, n] of counts) z[t] -= frequencyPenalty * n + presencePenalty;
  }
  return z;
}

/**
 * One reply as it is decoded (decode.py's Reply): `take` the row's logits after each run; it returns the piece the
 * picked token adds ({ token, text }: whole characters only, none that could begin a stop string, until it ends;
 * token null: what was held back, released at the end of text), or null, and sets `finish` once the reply is done
 * ("stop": end of text or a stop string; "length": maxNewTokens, or the row's cache is full; "error").
 */
export class Reply {
  constructor(ids, options, decode, eos, capacity) {
    const { maxNewTokens = 128, stop = [], seed = null, ignoreEos = false } = options;
    Object.assign(this, { ids, options, eos, capacity, maxNewTokens, stop, ignoreEos, sent: 0, finish: null, error: null });
    this.text = new Text(decode, stop);
    this.random = randomFrom(seed);
  }

  get tokens() { return this.text.tokens; }

  take(logits) {
    this.tFirst ??= performance.now();
    let finite = true;
    for (let i = 0; i < logits.length && finite; i++) finite = Number.isFinite(logits[i]);
    if (!finite) {
      Object.assign(this, { finish: "error", error: "the model's next-token scores are not finite numbers" });
      return null;
    }
    const token = pick(adjust(logits, this.tokens, this.options), this.options, this.random);
    if (this.eos.has(token) && !this.ignoreEos) {
      this.finish = "stop";  // the model ended its text: what was held back is its end
      const rest = this.text.text.slice(this.sent);
      this.sent += rest.length;
      return rest ? { token: null, text: rest } : null;
    }
    if (this.text.add(token)) this.finish = "stop";
    else if (this.tokens.length >= this.maxNewTokens || this.ids.length + this.tokens.length >= this.capacity)
      this.finish = "length";
    let text = this.finish ? this.text.text : this.text.done, end = text.length;
    if (!this.finish) end -= heldBack(text, this.stop);
    const piece = end > this.sent ? text.slice(this.sent, end) : "";
    this.sent = Math.max(this.sent, end);
    return { token, text: piece };
  }
}

export class Model {
  /**
   * Load an export folder served at `url` (ending in "/"): its manifest, tokenizer, chat template and
   * model.onnx with its external data, into an onnxruntime-web session.
   * options: device ("auto": WebGPU where the browser has an adapter, else "wasm"; or "webgpu" | "wasm"),
   * threads (wasm threads: 0 = onnxruntime-web's choice; more than 1 needs a cross-origin isolated page),
   * onProgress(stage, detail), fetch (a fetch function).
   */
  static async load(url, { device = "auto", threads = 0, onProgress = () => {}, fetch: fetchFn = fetch } = {}) {
    const base = new URL(url, globalThis.location?.href);
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    const at = (name) => new URL(name, base).href;
    const t0 = performance.now();
    onProgress("manifest", at(MANIFEST));
    const meta = await (await fetchOk(at(MANIFEST), "the export's manifest", fetchFn)).json();
    if (meta.format !== FORMAT) throw new QloraError(`${at(MANIFEST)} is not a qlora-rt export description`);
    if (meta.family !== "decoder")
      throw new QloraError(`${base.href} is a ${meta.family} export; the browser runtime runs decoders`);
    if (meta.kv_cache !== KV_CACHE)
      throw new QloraError(`${base.href} was exported by an older qlora-rt; export it again with \`qlora-rt export\``);
    onProgress("tokenizer", at("tokenizer.json"));
    const [tokenizerJson, tokenizerConfig] = await Promise.all([
      fetchOk(at("tokenizer.json"), "the tokenizer", fetchFn).then((r) => r.json()),
      fetchOk(at("tokenizer_config.json"), "the tokenizer's config", fetchFn).then((r) => r.json()),
    ]);
    // an export that says it has no template is not asked for one (a 404 is an error in the visitor's console)
    let template = meta.chat_template === false ? null
      : await fetchFn(at("chat_template.jinja")).then((r) => (r.ok ? r.text() : null), () => null);
    template ??= typeof tokenizerConfig.chat_template === "string" ? tokenizerConfig.chat_template : null;
    const adapters = await fetchFn(at("adapters.json")).then((r) => (r.ok ? r.json() : []), () => []);
    const needF16 = meta.kv_cache_dtype === "float16";
    if (device === "auto") device = await bestDevice(needF16);
    else if (device === "webgpu" && needF16 && !(await gpuAdapter())?.features.has("shader-f16"))
      throw new QloraError(`${base.href} keeps its KV cache in fp16, which this browser's WebGPU adapter cannot compute ` +
                           "(no shader-f16): open the page with ?device=wasm, or export with --kv-cache fp32");
    const ort = await runtime(device);
    if (threads > 0) ort.env.wasm.numThreads = threads;
    onProgress("model", at("model.onnx"));
    const modelBytes = new Uint8Array(await (await fetchOk(at("model.onnx"), "the model", fetchFn)).arrayBuffer());
    const externalData = Object.keys(meta.external_data ?? {}).map((path) => ({ path, data: at(path) }));
    // On WebGPU the cache stays on the GPU: each step's present.* come back as GPU buffers and go in as the next
    // step's past. (onnxruntime-web binds outputs to the GPU only in a run that feeds every input itself: the
    // site's graph takes the LoRA inputs without defaults, and the page feeds them, `loraFeeds`.)
    const gpuCache = device === "webgpu" ? Object.fromEntries(
      Array.from({ length: meta.layers }, (_, i) => [IO.present_key, IO.present_value].map((p) => [p.replace("%d", i), "gpu-buffer"]))
        .flat()) : undefined;
    let session;
    try {
      session = await ort.InferenceSession.create(modelBytes, {
        executionProviders: [device], externalData, graphOptimizationLevel: "all", logSeverityLevel: 3,
        preferredOutputLocation: gpuCache,
      });
    } catch (e) {
      throw new QloraError(`${at("model.onnx")}: onnxruntime-web (${device}) cannot load it (${String(e.message ?? e).split("\n")[0]})`);
    }
    const model = new Model(base.href, meta, session, new Tokenizer(tokenizerJson, tokenizerConfig), tokenizerConfig,
                            template, adapters, fetchFn);
    Object.assign(model, { ort, device });
    model.loadSeconds = (performance.now() - t0) / 1000;
    onProgress("ready", model.loadSeconds);
    return model;
  }

  constructor(url, meta, session, tokenizer, tokenizerConfig, template, adapterNames, fetchFn) {
    Object.assign(this, { url, meta, session, tokenizer, adapterNames, fetchFn });
    this.template = template ? new Template(template) : null;
    this.specialTokens = Object.fromEntries(
      ["bos_token", "eos_token", "pad_token", "unk_token"].map((k) => [k, tokenizerConfig[k] ?? null]));
    this.eos = new Set(meta.eos_token_ids);
    this._adapters = new Map();  // name -> Promise<{ input name: ort.Tensor }>
    // the LoRA inputs a run feeds (the site's graph has no defaults for them), and the base's: rank 0, no adapter
    this.loraInputs = session.inputNames.filter((n) => meta.lora_inputs?.[n]);
    this._zeros = null;
  }

  /** A LoRA input's tensor for the base (or an adapter that leaves its layer alone): rank 0, as the export's default. */
  zero(name) {
    this._zeros ??= new Map(this.loraInputs.map((n) =>
      [n, new this.ort.Tensor("float32", new Float32Array(0), this.meta.lora_inputs[n].map((d) => d ?? 0))]));
    return this._zeros.get(name);
  }

  /**
   * A run's LoRA feeds for an adapter (null: the base): every LoRA input of the graph, the adapter's own tensors
   * where it has them (on WebGPU already on the GPU), rank-0 zeros elsewhere.
   */
  async loraFeeds(adapter) {
    const tensors = adapter ? await this.adapter(adapter) : {};
    return Object.fromEntries(this.loraInputs.map((n) => [n, tensors[n] ?? this.zero(n)]));
  }

  /**
   * The tensors of adapters/NAME.onnx_adapter (or a URL ending in .onnx_adapter), fetched and checked once
   * against the export's LoRA inputs: { input name: ort.Tensor }, on WebGPU uploaded to the GPU once.
   */
  adapter(name) {
    if (this.meta.mode !== "adapter-aware")
      throw new QloraError(`adapter ${name}: ${this.url} is a merged export; its adapter is already in the weights`);
    if (!this._adapters.has(name)) {
      const known = this.adapterNames.length === 0 || this.adapterNames.includes(name);
      if (!name.endsWith(ADAPTER_SUFFIX) && !known)
        throw new QloraError(`no adapter named ${JSON.stringify(name)} (available: ${this.adapterNames.join(", ") || "none"})`);
      const url = new URL(name.endsWith(ADAPTER_SUFFIX) ? name : `adapters/${name}${ADAPTER_SUFFIX}`, this.url).href;
      const loading = fetchOk(url, "the adapter", this.fetchFn)
        .then((r) => r.arrayBuffer())
        .then((bytes) => this._prepareAdapter(url, new Uint8Array(bytes)))
        .catch((e) => {
          this._adapters.delete(name);
          throw e instanceof QloraError ? e : new QloraError(`${url}: not a readable .onnx_adapter file (${e.message ?? e})`);
        });
      this._adapters.set(name, loading);
    }
    return this._adapters.get(name);
  }

  async _prepareAdapter(url, bytes) {
    let params;
    try {
      params = readAdapter(bytes).params;
    } catch (e) {
      throw new QloraError(`${url}: not a readable .onnx_adapter file (${e.message ?? e})`);
    }
    const shapes = this.meta.lora_inputs ?? {};
    for (const [n, { dims }] of params) {  // each tensor one of the export's LoRA inputs, its fixed dimension equal
      const fixed = shapes[n];
      if (!fixed || fixed.some((d, k) => d !== null && d !== dims[k]))
        throw new QloraError(`${url}: ${n} [${dims}] is not a LoRA input of this export (an adapter of another model?)`);
    }
    const { Tensor } = this.ort, tensors = {};
    if (this.device !== "webgpu") {
      for (const [n, { dims, data }] of params) tensors[n] = new Tensor("float32", data, dims);
      return tensors;
    }
    const gpu = this.ort.env.webgpu.device;
    for (const [n, { dims, data }] of params) {
      const buffer = gpu.createBuffer({ size: Math.max(16, Math.ceil(data.byteLength / 16) * 16),
                                        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST });
      gpu.queue.writeBuffer(buffer, 0, data);
      tensors[n] = Tensor.fromGpuBuffer(buffer, { dataType: "float32", dims, dispose: () => buffer.destroy() });
    }
    return tensors;
  }

  /** Token ids of a prompt; chat (or a list of messages) renders the folder's chat template first. */
  encode(prompt, { chat = false, system = null } = {}) {
    if (typeof prompt === "string" && !prompt.trim()) throw new QloraError("the prompt is empty");
    if (chat || typeof prompt !== "string") {
      if (!this.template) throw new QloraError(`${this.url} has no chat template (chat_template.jinja or tokenizer_config.json)`);
      const messages = typeof prompt === "string" ? [{ role: "user", content: prompt }] : [...prompt];
      if (system) messages.unshift({ role: "system", content: system });
      const text = this.template.render({ messages, add_generation_prompt: true, ...this.specialTokens });
      return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    }
    return this.tokenizer.encode(prompt).ids;
  }

  decode(tokens) {  // tokenizers.js refuses an empty list
    return tokens.length ? this.tokenizer.decode(tokens, { skip_special_tokens: true }) : "";
  }

  /**
   * The completion as it is produced: yields { token, text } per token (text: what the token adds; empty while
   * a character is incomplete or the text may be starting a stop string; a last { token: null, text } releases
   * what was held back when the reply ends at its end-of-text token), and returns { text, tokens, finishReason,
   * promptTokens, ttftSeconds, decodeTokensPerSecond, cacheLocation } (finishReason "stop", "length" or "abort";
   * cacheLocation: where the KV cache stayed between steps, "gpu-buffer" on WebGPU, "cpu" on wasm).
   * options: chat, system, adapter (a name; null = the base), maxNewTokens (128), temperature (0 = greedy),
   * topK (0 = off), topP (1), seed, presencePenalty, frequencyPenalty, logitBias ({ token: bias }), stop (strings),
   * ids (token ids instead of a prompt), signal (an AbortSignal), ignoreEos (decode exactly maxNewTokens: benchmarks).
   */
  async *stream(prompt, options = {}) {
    const { chat = false, system = null, adapter = null, signal } = options;
    const { layers, kv_heads: kvHeads, head_dim: headDim, vocab, max_context: ctx } = this.meta;
    checkSampling(options, vocab);
    const ids = options.ids ?? this.encode(prompt, { chat, system });
    if (ids.length < 1) throw new QloraError("the prompt has no tokens");
    if (ids.length >= ctx) throw new QloraError(`the prompt is ${ids.length} tokens; this export's context is ${ctx} tokens`);
    const lora = await this.loraFeeds(adapter);
    const reply = new Reply(ids, options, (t) => this.decode(t), this.eos, ctx);
    const names = [];
    for (let i = 0; i < layers; i++) names.push(IO.past_key.replace("%d", i), IO.past_value.replace("%d", i));
    const { Tensor } = this.ort;
    const fed = new Set(this.session.inputNames);  // onnxruntime-web feeds no initializer: row_lengths, logits_to_keep
    const empty = this.meta.kv_cache_dtype === "float16" ? ["float16", new Uint16Array(0)] : ["float32", new Float32Array(0)];
    let past = Object.fromEntries(names.map((n) => [n, new Tensor(...empty, [1, kvHeads, 0, headDim])]));
    // one run: `tokens` at the end of the row's cache, which then holds `length` positions; the last position's logits
    const run = async (tokens, length) => {
      const feeds = { ...past, ...lora };
      for (const [name, [values, dims]] of Object.entries(feedValues(tokens, length)))
        if (fed.has(name)) feeds[name] = new Tensor("int64", BigInt64Array.from(values, BigInt), dims);
      const out = await this.session.run(feeds);
      const logits = out[IO.logits], rows = logits.dims[1];
      const last = (await logits.getData()).slice((rows - 1) * vocab, rows * vocab);
      logits.dispose();
      for (const t of Object.values(past)) t.dispose();
      past = Object.fromEntries(names.map((n) => [n, out[n.replace("past_key_values.", "present.")]]));
      cacheLocation = past[names[0]].location;
      return last;
    };
    let finishReason = null, length = ids.length, cacheLocation = null;
    const t0 = performance.now();
    try {
      let logits;
      for (const [end, chunk] of promptChunks(ids, 0, promptChunk(this.meta, ids.length))) logits = await run(chunk, end);
      for (;;) {
        if (signal?.aborted) { finishReason = "abort"; break; }
        const piece = reply.take(logits);
        if (piece) yield piece;
        if (reply.finish === "error") throw new QloraError(reply.error);
        if (reply.finish) break;
        logits = await run([reply.tokens.at(-1)], ++length);
      }
    } finally {
      for (const t of Object.values(past)) t.dispose();
    }
    const tEnd = performance.now(), tFirst = reply.tFirst ?? tEnd, n = reply.tokens.length;
    return {
      text: reply.text.text, tokens: reply.tokens, finishReason: finishReason ?? reply.finish, promptTokens: ids.length,
      ttftSeconds: (tFirst - t0) / 1000,
      decodeTokensPerSecond: n > 1 && tEnd > tFirst ? ((n - 1) * 1000) / (tEnd - tFirst) : 0,
      cacheLocation,
    };
  }

  /** The whole completion at once (see stream for the options and the result). */
  async generate(prompt, options = {}) {
    const it = this.stream(prompt, options);
    for (;;) {
      const { value, done } = await it.next();
      if (done) return value;
    }
  }
}
