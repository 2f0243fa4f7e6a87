// The page of `fusionnet serve`: one upload -> alpha, cut-out and composite from POST /matte.
// Alpha is asked first (the inference); cut-out and composite then come from the server's result cache.
"use strict";

const $ = (id) => document.getElementById(id);
const OUTPUTS = ["alpha", "rgba", "composite"];
let current = null; // the last file, matted again when an option changes
let generation = 0; // a newer upload makes older answers stale

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function query(output) {
  const params = new URLSearchParams({ output });
  params.set("background", $("background").value.replace("#", ""));
  params.set("refine", $("refine").checked ? "true" : "false");
  if ($("max-side").value) params.set("max_side", $("max-side").value);
  return params.toString();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function matte(file, output) {
  for (let attempt = 0; ; attempt++) {
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    const response = await fetch(`/matte?${query(output)}`, { method: "POST", body: form });
    if (response.status === 503 && attempt < 10) { // busy: wait as told, then try again
      await sleep(1000 * Number(response.headers.get("Retry-After") || 1));
      continue;
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      throw new Error(`${output}: ${message}`);
    }
    return {
      blob: await response.blob(),
      ms: Number(response.headers.get("X-Fusionnet-Ms")),
      size: response.headers.get("X-Fusionnet-Size"),
      cache: response.headers.get("X-Fusionnet-Cache"),
    };
  }
}

function setImage(id, blob) {
  const img = $(id);
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  delete img.dataset.ready;
  img.onload = () => { img.dataset.ready = "1"; };
  img.src = URL.createObjectURL(blob);
  const link = $(`${id}-link`);
  if (link) { link.href = img.src; link.hidden = false; }
}

function clearResults() {
  for (const id of ["input", ...OUTPUTS]) {
    const img = $(id);
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.removeAttribute("src");
    delete img.dataset.ready;
    const link = $(`${id}-link`);
    if (link) link.hidden = true;
  }
}

async function show(file) {
  const mine = ++generation;
  current = file;
  showError("");
  clearResults();
  setImage("input", file);
  $("status").textContent = `Matting ${file.name}…`;
  const started = performance.now();
  try {
    const alpha = await matte(file, "alpha");
    if (mine !== generation) return;
    setImage("alpha", alpha.blob);
    const rest = await Promise.all(["rgba", "composite"].map((output) => matte(file, output)));
    if (mine !== generation) return;
    setImage("rgba", rest[0].blob);
    setImage("composite", rest[1].blob);
    const total = Math.round(performance.now() - started);
    $("status").textContent = `${file.name}: ${alpha.size}, alpha in ${Math.round(alpha.ms)} ms on the server, `
      + `all three in ${total} ms`;
    document.body.dataset.done = String(mine);
  } catch (error) {
    if (mine !== generation) return;
    $("status").textContent = `${file.name}: failed`;
    showError(error.message);
    document.body.dataset.failed = String(mine);
  }
}

async function loadHealth() {
  try {
    const health = await (await fetch("/health")).json();
    const model = health.model || {};
    $("model").textContent = `model: ${model.spec} (sha256 ${String(model.sha256).slice(0, 12)}…), `
      + `${health.device}, ${health.precision}, network side ${health.max_side}`;
  } catch (error) {
    $("model").textContent = `model: /health did not answer (${error.message})`;
  }
}

function setUp() {
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) show(file);
  });
  $("file").addEventListener("change", () => { if ($("file").files[0]) show($("file").files[0]); });
  $("options").addEventListener("change", () => { if (current) show(current); });
  $("options").addEventListener("submit", (event) => event.preventDefault());
  $("curl").textContent = `curl -F file=@photo.jpg '${location.origin}/matte?output=rgba' -o cutout.png`;
  loadHealth();
}

setUp();
