// End-to-end browser test: serves the trunk-built demo page and the
// wasm-pack-built npm package on 127.0.0.1, drives Debian's Chromium
// headless on WebGPU (SwiftShader), runs real edits on the bundled model
// and checks the new object becomes the prediction. Screenshots go to
// target/web-e2e/.
//
//   node tests/web/e2e.mjs <trunk dist> <wasm-pack pkg> <screenshot dir>
import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { serve } from "./serve.mjs";

const [dist, pkg, shots] = process.argv.slice(2).map((p) => resolve(p));
const fixtures = resolve(new URL("../fixtures", import.meta.url).pathname);
mkdirSync(shots, { recursive: true });
const here = resolve(new URL(".", import.meta.url).pathname);
const { server, url } = await serve([
  ["/pkg/", pkg],
  // The npm test reads the fixture itself; the page reads its own copy (with
  // the statistics made at build time) from the dist.
  ["/fixtures/facts-gpt2/", join(fixtures, "facts-gpt2")],
  ["/npm-test/", here],
  ["/", dist],
]);

const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "memit-chromium-")), {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--enable-unsafe-webgpu", "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
});
let failures = 0;
const check = (ok, message) => {
  console.log(`${ok ? "ok  " : "FAIL"} ${message}`);
  if (!ok) failures++;
};
const watch = (page, name) => {
  page.on("console", (m) => m.type() === "error" && console.log(`[${name} console] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`[${name} page error] ${e.message}`));
};

try {
  // 1. The demo page.
  const page = await context.newPage();
  watch(page, "demo");
  await page.goto(url + "/");
  check(await page.evaluate(() => !!navigator.gpu), "the browser offers WebGPU");
  await page.waitForFunction(() => !!window.wasmBindings, null, { timeout: 120_000 });
  await page.click('[data-testid="load-bundled"]');
  const status = page.locator('[data-testid="status"]');
  await page.waitForFunction(() => {
    const s = document.querySelector('[data-testid="status"]').textContent;
    return s.startsWith("Ready") || !document.querySelector('[data-testid="error"]').hidden;
  }, null, { timeout: 600_000 });
  check((await status.textContent()).startsWith("Ready"), `model and statistics loaded: ${await status.textContent()} ${await page.locator('[data-testid="error"]').textContent()}`);
  check((await status.textContent()).includes("statistics loaded from the page's file"), "the page uses the statistics the CLI made at build time");
  await page.click('[data-testid="edit"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="after-top1-0"]') || !document.querySelector('[data-testid="error"]').hidden, null, { timeout: 600_000 });
  const target = await page.inputValue("#target");
  const before = await page.locator('[data-testid="before-top1-0"]').textContent().catch(() => null);
  const after = await page.locator('[data-testid="after-top1-0"]').textContent().catch(() => null);
  console.log(`demo: prompt top-1 before ${before}, after ${after} (status: ${await status.textContent()})`);
  check(after === JSON.stringify(" " + target), `after the edit the page shows ${JSON.stringify(" " + target)} as the prediction`);
  check(before !== after, "before the edit the prediction was different");
  await page.screenshot({ path: join(shots, "demo-after-edit.png"), fullPage: true });
  await page.click('[data-testid="revert"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="status"]').textContent.startsWith("Reverted"), null, { timeout: 300_000 });
  const restored = await page.locator('[data-testid="after-top1-0"]').textContent();
  check(restored === before, `after undo the prediction is back to ${before}`);
  await page.screenshot({ path: join(shots, "demo-after-revert.png"), fullPage: true });

  // 2. The npm package, imported as built.
  const npm = await context.newPage();
  watch(npm, "npm");
  await npm.goto(url + "/npm-test/npm-test.html");
  await npm.waitForFunction(() => window.testResult, null, { timeout: 600_000 });
  const r = await npm.evaluate(() => window.testResult);
  if (r.error) console.log(r.error);
  check(!r.error, "the npm package loads a model, computes statistics and edits");
  if (!r.error) {
    check(r.before[0].token === " French" && r.after[0].token === " English", `package edit: ${r.before[0].token} -> ${r.after[0].token}`);
    check(r.reverted && r.restored[0].token === " French" && Math.abs(r.restored[0].prob - r.before[0].prob) < 1e-6, "package revert restores the original prediction exactly");
    check(r.second.method === "memit-seq" && r.second.edits_so_far === 2, `memit-seq counts the edits of a sequence: ${r.second.method} ${r.second.edits_so_far}`);
    const space = r.alpha.null_space_dimensions;
    check(r.alpha.method === "alphaedit" && space.length === 1 && space[0][0] === 3 && space[0][1] > 0 && space[0][1] < 512, `AlphaEdit's null space: ${JSON.stringify(space)}`);
  }
} finally {
  await context.close();
  server.close();
}
console.log(failures ? `browser tests: ${failures} failed` : "browser tests: all passed");
process.exit(failures ? 1 : 0);
