// Opens one page in headless Chromium and prints the JSON it leaves in window.bench (bench/web_transformers_js.py):
//   node drive_page.mjs URL TIMEOUT_S > OUT.json      Chromium: $CHROMIUM or /usr/bin/chromium
import { createRequire } from "node:module";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const web = process.env.QLORA_RT_WEB ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "qlora_rt", "web");
const puppeteer = createRequire(join(web, "package.json"))("puppeteer-core");
const [url, timeoutS = "1800"] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "qlora-rt-chromium-"));
const browser = await puppeteer.launch({  // the flags of tests/web/drive.mjs, so both pages run alike
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", headless: true, userDataDir: profile,
  protocolTimeout: Number(timeoutS) * 1000,
  args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--disable-gpu"],
});
const lines = [];
try {
  const page = await browser.newPage();
  page.on("console", (m) => lines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => lines.push(`pageerror: ${e.message}`));
  await page.goto(url);
  const end = Date.now() + Number(timeoutS) * 1000;
  while (!(await page.evaluate(() => Boolean(window.bench)))) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutS} s`);
    await new Promise((r) => setTimeout(r, 200));
  }
  process.stdout.write(JSON.stringify({ ...(await page.evaluate(() => window.bench)), console: lines }));
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
