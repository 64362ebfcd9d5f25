// transformers.js (Node, onnxruntime-node) on an export folder, loaded the documented way (docs/devices.md):
//   node transformers_js.mjs FOLDER PROMPTS.json NEW > OUT.json
// PROMPTS.json: a list of strings. Prints [{"ids": prompt ids (its own tokenizer), "tokens": greedy new tokens}].
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const web = process.env.QLORA_RT_WEB ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "qlora_rt", "web");
const { env, AutoModelForCausalLM, AutoTokenizer } = await import(
  createRequire(join(web, "package.json")).resolve("@huggingface/transformers"));
const [folder, promptsFile, n] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = dirname(resolve(folder)) + "/";
const id = basename(resolve(folder));
const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id, { subfolder: "", dtype: "fp32", device: "cpu" });
const out = [];
for (const prompt of JSON.parse(readFileSync(promptsFile, "utf8"))) {
  const inputs = tokenizer(prompt, { add_special_tokens: false });
  const ids = Array.from(inputs.input_ids.data, Number);
  const seq = await model.generate({ ...inputs, max_new_tokens: Number(n), do_sample: false });
  out.push({ ids, tokens: Array.from(seq.data, Number).slice(ids.length) });
}
process.stdout.write(JSON.stringify(out));
