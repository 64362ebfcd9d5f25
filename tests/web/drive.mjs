// Drives a `qlora-rt web` site in headless Chromium: node drive.mjs URL CASES.json > RESULTS.json
//
// CASES.json: {"cases": [{"api": {"prompt": ..., "options": {...}}} | {"ui": {"prompt", "adapter", "chat",
// "maxNewTokens"}}, ...]}. Each "api" case calls the page's Model.generate; each "ui" case fills the form,
// clicks Generate and reads the tokens the page shows. Prints {"page": {...}, "results": [...], "console": [...]}.
// Chromium: $CHROMIUM or /usr/bin/chromium. puppeteer-core: from qlora_rt/web/node_modules ($QLORA_RT_WEB).
import { createRequire } from "node:module";
import { readFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const web = process.env.QLORA_RT_WEB ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "qlora_rt", "web");
const puppeteer = createRequire(join(web, "package.json"))("puppeteer-core");
const [url, casesFile] = process.argv.slice(2);
// chromiumArgs: more flags (e.g. a software WebGPU adapter); query: appended to the URL (e.g. "?device=webgpu")
const { cases, timeoutMs = 600000, chromiumArgs = [], query = "" } = JSON.parse(readFileSync(casesFile, "utf8"));
const profile = mkdtempSync(join(tmpdir(), "qlora-rt-chromium-"));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  protocolTimeout: timeoutMs,
  userDataDir: profile,
  // as root in a container Chromium needs --no-sandbox; the rest keep it off this machine's closed network
  args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         ...(chromiumArgs.length ? chromiumArgs : ["--disable-gpu"])],
});
const consoleLines = [];

// page.evaluate every 200 ms until the predicate holds (waitForFunction hangs on this Chromium's headless mode)
async function until(page, predicate) {
  const end = Date.now() + timeoutMs;
  while (!(await page.evaluate(predicate))) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${predicate}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(timeoutMs);
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  page.on("error", (e) => { consoleLines.push(`crash: ${e.message}`); process.stderr.write(`page crashed: ${e.message}\n`); });
  if (process.env.QLORA_RT_WEB_DEBUG) page.on("console", (m) => process.stderr.write(`${m.type()}: ${m.text()}\n`));
  const t0 = Date.now();
  await page.goto(url + query);
  await until(page, () => window.qlora && (window.qlora.ready || window.qlora.error));
  const info = await page.evaluate(() => ({
    error: window.qlora.error, status: document.getElementById("status").textContent,
    loadSeconds: window.qlora.model?.loadSeconds, adapters: window.qlora.model?.adapterNames,
    crossOriginIsolated: globalThis.crossOriginIsolated, device: window.qlora.model?.device,
  }));
  info.pageSeconds = (Date.now() - t0) / 1000;
  const results = [];
  if (!info.error) {
    for (const c of cases) {
      process.stderr.write(`case ${JSON.stringify(c)}\n`);
      if (c.api) {
        results.push(await page.evaluate(async ({ prompt, options, stream }) => {
          try {
            const m = window.qlora.model;
            if (stream) {  // the pieces as they come, joined: they must add up to the reply's text
              const it = m.stream(prompt, options), pieces = [];
              let step;
              while (!(step = await it.next()).done) pieces.push(step.value.text);
              return { ...step.value, streamed: pieces.join(""), pieces: pieces.length };
            }
            const r = await m.generate(prompt, options);
            return { ...r, promptIds: options.ids ?? m.encode(prompt, options) };
          } catch (e) {
            return { error: `${e.name}: ${e.message}` };
          }
        }, c.api));
      } else {
        const { prompt, adapter = "", chat = false, maxNewTokens = 16 } = c.ui;
        await page.$eval("#prompt", (el, v) => { el.value = v; }, prompt);
        await page.select("#adapter", adapter);
        await page.$eval("#chat", (el, v) => { el.checked = v; }, chat);
        await page.$eval("#max-tokens", (el, v) => { el.value = String(v); }, maxNewTokens);
        await page.$eval("#form", (form) => form.requestSubmit(document.getElementById("generate")));
        await until(page, () => /^done/.test(document.getElementById("status").textContent)
                                || document.getElementById("status").className === "error");
        results.push(await page.evaluate(() => ({
          tokens: JSON.parse(document.getElementById("output").dataset.tokens),
          text: document.getElementById("output").textContent,
          status: document.getElementById("status").textContent,
        })));
      }
    }
  }
  process.stdout.write(JSON.stringify({ page: info, results, console: consoleLines }));
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
