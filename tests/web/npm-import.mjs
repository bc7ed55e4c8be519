// Imports the wasm-pack-built package in Node as a consumer would and checks
// its public surface and TypeScript types (running it needs WebGPU: that
// happens in the browser test).
//
//   node tests/web/npm-import.mjs <wasm-pack pkg>
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const pkg = resolve(process.argv[2]);
const manifest = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8"));
const fail = (m) => { console.error(`FAIL ${m}`); process.exit(1); };
if (manifest.name !== "memit-wgpu") fail(`package name ${manifest.name}`);
// npm always packs a file named LICENSE (not LICENSE-MIT and the like
// unless package.json lists them): one file holds both licences.
const license = readFileSync(join(pkg, "LICENSE"), "utf8");
if (!license.includes("Permission is hereby granted") || !license.includes("Apache License")) fail("LICENSE lacks the MIT or the Apache-2.0 text");
const types = readFileSync(join(pkg, manifest.types), "utf8");
for (const name of ["class Editor", "static load(files: ModelFiles", "edit(requests: EditRequest[] | EasyEditRequests", "method?: \"memit\" | \"memit-seq\" | \"alphaedit\"", "interface EditResult", "revert(): boolean", "computeStats(corpus: string", "loadStats(bytes: Uint8Array)"]) {
  if (!types.includes(name)) fail(`types lack ${JSON.stringify(name)}`);
}
const mod = await import(pathToFileURL(join(pkg, manifest.module || manifest.main)).href);
if (typeof mod.default !== "function" || typeof mod.Editor !== "function" || typeof mod.Editor.load !== "function") fail("exports: default init() and Editor.load");
for (const method of ["edit", "generate", "predict", "revert", "computeStats", "loadStats", "info"]) {
  if (typeof mod.Editor.prototype[method] !== "function") fail(`Editor.prototype.${method}`);
}
console.log(`ok   npm package ${manifest.name}@${manifest.version} imports with Editor and its types`);
