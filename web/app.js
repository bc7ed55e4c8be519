// The demo page: loads a model into the memit-wgpu `Editor` (Rust + WGSL on
// WebGPU), rewrites one fact and shows predictions before and after.

const $ = (id) => document.getElementById(id);
let editor = null;

/** The wasm exports, once trunk's loader has initialised the module. */
function bindings() {
  if (window.wasmBindings) return Promise.resolve(window.wasmBindings);
  return new Promise((resolve) => addEventListener("TrunkApplicationStarted", () => resolve(window.wasmBindings), { once: true }));
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

/** Seconds spent in each phase of the last action, in order. */
const phases = { list: [], current: null, since: 0 };

function phase(name) {
  const now = performance.now();
  if (phases.current !== null) phases.list.push([phases.current, (now - phases.since) / 1000]);
  phases.current = name;
  phases.since = now;
  const shown = phases.list.map(([n, s]) => `${n} ${s.toFixed(1)} s`);
  $("phases").textContent = shown.join(" · ") || "–";
  $("phases").dataset.json = JSON.stringify(phases.list);
}

function onProgress(p) {
  if (p.stage !== phases.current) phase(p.stage);
  $("progress").max = Math.max(p.total, 1);
  $("progress").value = p.done;
  setStatus(`${p.stage}: ${p.done} / ${p.total}`);
}

const ACTIONS = ["load-bundled", "load-smollm2", "load-files"];

function busy(on) {
  for (const id of ACTIONS) $(id).disabled = on;
  $("edit").disabled = on || !editor;
  $("revert").disabled = on || !editor;
}

async function run(task) {
  showError(null);
  busy(true);
  phases.list = [];
  phases.current = null;
  try {
    await task();
  } catch (e) {
    console.error(e);
    showError(e);
    setStatus("Failed.");
  } finally {
    phase(null);
    busy(false);
  }
}

async function load(files) {
  const { Editor } = await bindings();
  editor = null;
  editor = await Editor.load(files, { f16: $("use-f16").checked, onProgress });
  const info = editor.info();
  $("model-info").textContent = `${info.arch}, ${info.layers} layers, d_model ${info.d_model}, vocab ${info.vocab}; MEMIT edits layers ${info.hparams.layers.join(", ")}; GPU: ${info.adapter || "WebGPU adapter"}`;
}

const seconds = (since) => ((performance.now() - since) / 1000).toFixed(1);

async function loadBundled() {
  const base = new URL("facts-gpt2/", location.href).href;
  const start = performance.now();
  await load({ config: base + "config.json", tokenizer: base + "tokenizer.json", weights: [base + "model.safetensors"] });
  const model = seconds(start);
  phase("statistics file");
  const statsStart = performance.now();
  // The statistics the CLI made when the page was built, unless asked to
  // compute them here (from the same 400 texts).
  const file = $("compute-stats").checked ? null : await fetch(base + "stats.safetensors");
  let how;
  if (file && file.ok) {
    editor.loadStats(new Uint8Array(await file.arrayBuffer()));
    how = "statistics loaded from the page's file";
  } else {
    const corpus = await (await fetch(base + "train.txt")).text();
    const stats = await editor.computeStats(corpus, { nTexts: 400, maxLen: 64, onProgress });
    how = `statistics computed here from ${stats.n_tokens} tokens`;
  }
  setStatus(`Ready: model loaded in ${model} s, ${how} in ${seconds(statsStart)} s.`);
}

/** Example facts that each offered model knows, to rewrite. */
const EXAMPLES = {
  smollm2: { prompt: "{} is located in the city of", subject: "The Eiffel Tower", target: "Rome", paraphrase: "The Eiffel Tower stands in the city of", neighbour: "The Louvre is located in the city of" },
};

function fillExample(example) {
  for (const [id, value] of Object.entries(example)) $(id).value = value;
}

/** SmolLM2 from a URL (or the picked .gguf), with the statistics file the
 * page was built with (web/make-stats.sh), else a picked one. */
async function loadSmolLM2() {
  const picked = [...$("model-files").files].find((f) => f.name.endsWith(".gguf"));
  const gguf = picked || new URL($("gguf-url").value, location.href).href;
  const start = performance.now();
  await load({ gguf });
  const model = seconds(start);
  phase("statistics file");
  const statsStart = performance.now();
  const shipped = await fetch(new URL("smollm2/stats.safetensors", location.href));
  const own = $("stats-file").files[0];
  let how;
  if (own && own.name.endsWith(".safetensors")) {
    editor.loadStats(new Uint8Array(await own.arrayBuffer()));
    how = `statistics loaded from ${own.name}`;
  } else if (shipped.ok) {
    editor.loadStats(new Uint8Array(await shipped.arrayBuffer()));
    how = "statistics loaded from the page's file";
  } else {
    fillExample(EXAMPLES.smollm2);
    setStatus(`Loaded in ${model} s. This page was built without SmolLM2 statistics: make them with memit-wgpu stats and pick the file, or pick a corpus, then load again.`);
    return;
  }
  fillExample(EXAMPLES.smollm2);
  setStatus(`Ready: model loaded in ${model} s, ${how} in ${seconds(statsStart)} s.`);
}

async function loadFiles() {
  const files = [...$("model-files").files];
  const named = (name) => files.find((f) => f.name === name);
  const weights = files.filter((f) => f.name.endsWith(".safetensors"));
  const gguf = files.find((f) => f.name.endsWith(".gguf"));
  if (gguf) {
    await load({ gguf });
  } else if (!named("config.json") || !named("tokenizer.json") || weights.length === 0) {
    throw new Error("Pick config.json, tokenizer.json and the model's .safetensors file(s) together, or one .gguf file.");
  } else {
    await load({ config: named("config.json"), tokenizer: named("tokenizer.json"), weights });
  }
  phase("statistics");
  const stats = $("stats-file").files[0];
  if (!stats) {
    setStatus("Loaded. Pick a statistics cache or a corpus file to edit.");
  } else if (stats.name.endsWith(".safetensors")) {
    editor.loadStats(new Uint8Array(await stats.arrayBuffer()));
    setStatus("Ready: statistics loaded.");
  } else {
    const summary = await editor.computeStats(await stats.text(), { nTexts: 2000, maxLen: 128, onProgress });
    setStatus(`Ready: statistics from ${summary.n_tokens} tokens in ${summary.seconds.toFixed(1)} s.`);
  }
}

/** Greedy continuation and top-5 next tokens for each prompt. */
async function snapshot(prompts) {
  const rows = [];
  const tokens = Math.max(0, Math.min(64, Number($("gen-tokens").value) || 0));
  for (const prompt of prompts) {
    rows.push({ generation: tokens ? await editor.generate(prompt, tokens) : "", top: await editor.predict(prompt, 5) });
  }
  return rows;
}

function cell(row, target, testid) {
  const td = document.createElement("td");
  const gen = document.createElement("div");
  gen.className = "generation";
  gen.textContent = row.generation ? "…" + row.generation : "";
  td.append(gen);
  row.top.forEach((p, i) => {
    const bar = document.createElement("div");
    bar.className = "bar" + (p.token.trim() === target.trim() ? " hit" : "");
    const token = document.createElement("code");
    token.textContent = JSON.stringify(p.token);
    if (i === 0) token.dataset.testid = testid;
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(1, Math.round(p.prob * 160))}px`;
    const pct = document.createElement("span");
    pct.textContent = `${(100 * p.prob).toFixed(1)}%`;
    bar.append(token, fill, pct);
    td.append(bar);
  });
  return td;
}

function render(prompts, labels, before, after, target) {
  const body = $("results").querySelector("tbody");
  body.replaceChildren();
  prompts.forEach((prompt, i) => {
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    name.className = "prompt";
    name.textContent = `${labels[i]}: ${prompt}`;
    tr.append(name, cell(before[i], target, `before-top1-${i}`), cell(after[i], target, `after-top1-${i}`));
    body.append(tr);
  });
}

let lastPrompts = null;

async function edit() {
  const subject = $("subject").value.trim();
  const prompt = $("prompt").value;
  const target = $("target").value.trim();
  const prompts = [prompt.replace("{}", subject), $("paraphrase").value.trim(), $("neighbour").value.trim()];
  const labels = ["prompt", "paraphrase", "neighbour"];
  const keep = prompts.map((p, i) => [p, labels[i]]).filter(([p]) => p);
  lastPrompts = { prompts: keep.map((k) => k[0]), labels: keep.map((k) => k[1]), target };
  setStatus("Predicting before the edit…");
  phase("predictions before");
  const before = await snapshot(lastPrompts.prompts);
  lastPrompts.before = before;
  const result = await editor.edit([{ prompt, subject, target_new: { str: target } }], {
    templates: $("generated-templates").checked ? "generated" : "plain",
    onProgress,
  });
  setStatus("Predicting after the edit…");
  phase("predictions after");
  const after = await snapshot(lastPrompts.prompts);
  render(lastPrompts.prompts, lastPrompts.labels, before, after, target);
  const warnings = result.warnings.length ? ` Warning: ${result.warnings.join("; ")}` : "";
  setStatus(`Edited layers ${result.layers.join(", ")} in ${result.seconds.toFixed(1)} s.${warnings}`);
}

async function revert() {
  const any = editor.revert();
  phase("predictions after undo");
  if (lastPrompts) {
    const now = await snapshot(lastPrompts.prompts);
    render(lastPrompts.prompts, lastPrompts.labels, lastPrompts.before, now, lastPrompts.target);
  }
  setStatus(any ? "Reverted: the original weights are back." : "Nothing to undo.");
}

if (!navigator.gpu) {
  $("no-webgpu").hidden = false;
  for (const id of ACTIONS) $(id).disabled = true;
  setStatus("WebGPU unavailable.");
} else {
  $("load-bundled").onclick = () => run(loadBundled);
  $("load-smollm2").onclick = () => run(loadSmolLM2);
  $("load-files").onclick = () => run(loadFiles);
  $("edit").onclick = () => run(edit);
  $("revert").onclick = () => run(revert);
}
