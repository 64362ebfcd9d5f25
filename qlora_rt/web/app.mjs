// The page: loads the export under ./model/ and streams completions into #output. window.qlora holds the
// loaded Model for scripts (and tests) that drive it directly.
import { Model } from "./qlora-rt.mjs";

const $ = (id) => document.getElementById(id);
const status = (text, error = false) => { $("status").textContent = text; $("status").className = error ? "error" : ""; };
window.qlora = { ready: false, error: null };

async function main() {
  // ?device=webgpu|wasm picks the backend (default: WebGPU where the browser has an adapter)
  const device = new URLSearchParams(location.search).get("device") ?? "auto";
  const threads = crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const model = await Model.load("./model/", { device, threads, onProgress: (stage) => status(`loading ${stage}…`) });
  Object.assign(window.qlora, { model, ready: true });
  $("model-name").textContent = model.meta.base_model.split("/").pop();
  for (const name of model.adapterNames) $("adapter").add(new Option(name, name));
  if (model.meta.mode !== "adapter-aware") $("adapter").disabled = true;
  $("chat").checked = model.template !== null;
  $("chat").disabled = model.template === null;
  status(`ready: ${model.meta.mode} export, loaded in ${model.loadSeconds.toFixed(1)} s ` +
         `(onnxruntime-web ${model.ort.env.versions.web}, ${model.device}` +
         `${model.device === "wasm" ? `, ${model.ort.env.wasm.numThreads} thread(s)` : ""})`);
  $("generate").disabled = false;
  let controller = null;
  $("cancel").onclick = () => controller?.abort();
  $("form").onsubmit = async (event) => {
    event.preventDefault();
    const seed = $("seed").value === "" ? null : Number($("seed").value);
    const options = {
      chat: $("chat").checked, adapter: $("adapter").value || null, maxNewTokens: Number($("max-tokens").value),
      temperature: Number($("temperature").value), topP: Number($("top-p").value), seed,
    };
    controller = new AbortController();
    options.signal = controller.signal;
    $("generate").disabled = true;
    $("cancel").disabled = false;
    $("output").textContent = "";
    $("output").dataset.tokens = "[]";
    status("generating…");
    try {
      const it = model.stream($("prompt").value, options);
      let step;
      while (!(step = await it.next()).done) $("output").textContent += step.value.text;
      const r = step.value;
      $("output").textContent = r.text;
      $("output").dataset.tokens = JSON.stringify(r.tokens);
      status(`done (${r.finishReason}): ${r.tokens.length} tokens, first after ${r.ttftSeconds.toFixed(2)} s, ` +
             `then ${r.decodeTokensPerSecond.toFixed(1)} tokens/s`);
    } catch (e) {
      status(e.message, true);
    } finally {
      $("generate").disabled = false;
      $("cancel").disabled = true;
    }
  };
}

main().catch((e) => {
  window.qlora.error = String(e.message ?? e);
  status(window.qlora.error, true);
});
