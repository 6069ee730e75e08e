// The page's behaviour: load the registry, build the request from the form, follow the job's
// event stream and hand the data to render.js. Relevance arrays are asked for as JSON
// ("encoding": "json"), so the page needs no float16 decoder.

import * as render from "./render.js";

const $ = (id) => document.getElementById(id);

let models = {};
let job = null; // {id, task, mode, source, result}
let gen = null; // generation state: pieces, prompt length, relevance per step, selection

// ------------------------------------------------------------------ models and the form

async function loadModels() {
  try {
    const list = (await api("GET", "/models")).models;
    models = Object.fromEntries(list.map((m) => [m.id, m]));
    $("model").replaceChildren(
      ...list.map((m) => new Option(`${m.id} (${m.task})`, m.id)),
    );
    chooseModel();
  } catch (err) {
    showError(`Could not load the models: ${err.message}`);
  }
}

/** Show only the inputs that fit the chosen model's task, bounded by its limits. */
function chooseModel() {
  const model = models[$("model").value];
  if (!model) return;
  const expects = model.expects ? ` Expects: ${model.expects}.` : "";
  $("model-description").textContent = (model.description || "") + expects;
  for (const set of document.querySelectorAll("fieldset[data-tasks]")) {
    const fits = set.dataset.tasks.split(" ").includes(model.task);
    set.hidden = !fits;
    set.disabled = !fits;
  }
  const limits = model.limits || {};
  $("max-new-tokens").max = limits.max_new_tokens ?? "";
  $("max-new-tokens").value = Math.min(Number($("max-new-tokens").value) || 8,
    limits.max_new_tokens ?? 64);
  $("num-beams").max = limits.max_beams ?? "";
  toggleSampling();
}

function toggleSampling() {
  const sampling = $("sampling").checked;
  for (const input of $("sampling-settings").querySelectorAll("input")) {
    input.disabled = !sampling;
  }
}

const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));

/** The POST /run_task body for the chosen model, from the form. */
async function buildRequest(model) {
  const body = {
    model: model.id,
    inputs: {},
    relevance: { mode: $("mode").value, multiplier: number("multiplier") },
    output: { encoding: "json", dtype: "float32" },
  };
  // Modes "reference" and "contrast" start from the input with its features removed: a blurred
  // image, or masked tokens (the choices that make them most faithful in bench.faithfulness).
  const removed = {
    "image-classification": "blur",
    "text-classification": "mask",
    "token-classification": "mask",
    "question-answering": "mask",
  }[model.task];
  const fromReference = ["reference", "contrast"].includes(body.relevance.mode);
  if (fromReference && removed) body.relevance.reference = removed;
  // Mode "contrast" explains the output against the runner-up unless another is named.
  const against = $("contrast-with").value.trim();
  if (body.relevance.mode === "contrast" && against) {
    body.relevance.contrast_with = /^\d+$/.test(against) ? Number(against) : against;
  }
  if (model.task === "image-classification") {
    const file = $("image").files[0];
    if (!file) throw new Error("choose an image file first");
    body.inputs.image = await dataUrl(file);
  } else if (model.task === "tabular-classification") {
    body.inputs.features = $("features").value.split(",").map(Number);
  } else {
    body.inputs.text = $("text").value;
  }
  if (model.task === "generation") {
    const sampling = $("sampling").checked;
    body.generation = {
      max_new_tokens: number("max-new-tokens"),
      num_beams: number("num-beams"),
      path: $("path").value,
      do_sample: sampling,
    };
    if (sampling) {
      body.relevance.temperature = number("temperature");
      body.generation.top_k = number("top-k");
      body.generation.top_p = number("top-p");
      body.generation.seed = number("seed");
    }
  }
  return body;
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------ running a job

async function submit(event) {
  event.preventDefault();
  const model = models[$("model").value];
  if (!model) return;
  stopJob();
  reset();
  try {
    const accepted = await api("POST", "/run_task", await buildRequest(model));
    job = {
      id: accepted.job_id,
      task: accepted.task,
      mode: $("mode").value,
      heatmap: accepted.urls.heatmap,
      source: null,
    };
    $("cancel").disabled = false;
    setStatus(`Job ${job.id} queued.`);
    if (job.task === "generation") startGeneration();
    follow(accepted.urls.events);
  } catch (err) {
    showError(err.message);
  }
}

/** Follow the job's Server-Sent Events. The browser reconnects by itself with
 *  Last-Event-ID (the ids are Redis stream ids), so a dropped connection loses nothing. */
function follow(url) {
  const source = new EventSource(url);
  job.source = source;
  const on = (name, handler) =>
    source.addEventListener(name, (e) => handler(JSON.parse(e.data)));
  on("queued", () => setStatus("Queued, waiting for a worker."));
  on("started", (d) => setStatus(`Running on ${d.worker}.`));
  on("prompt", (d) => addPrompt(d.text[0]));
  on("token", (d) => addToken(d));
  on("relevance", (d) => addRelevance(d.step, d.input_ids.values[0]));
  on("done", () => finish());
  on("canceled", (d) => end(`Canceled: ${d.message}`));
  // A server "error" event and a connection error share the name: only the first has data.
  source.addEventListener("error", (e) => {
    if (e.data) end(`The job failed: ${JSON.parse(e.data).message}`);
    else if (source.readyState === EventSource.CLOSED) end("The event stream closed.");
    else setStatus("Connection lost, reconnecting…");
  });
}

async function finish() {
  const current = job;
  stopJob();
  try {
    const view = await api("GET", `/jobs/${current.id}`);
    if (job !== current) return; // another run started meanwhile
    current.result = view.result;
    setStatus(`Finished in ${(view.timings?.total_s ?? 0).toFixed(2)} s.`);
    showWarnings(view.result.warnings ?? []);
    if (current.task === "generation") {
      showGenerationReport(); // per step: it follows the selected token
      return;
    }
    let conservation = view.result.conservation;
    if (current.task === "image-classification") await showImage(view.result);
    else if (view.result.inputs[0]?.seeds) {
      showTokens(view.result);
      conservation = seedTotals(conservation);
    } else showClassification(view.result);
    showReport(current, conservation, view.result.timings);
  } catch (err) {
    showError(`Could not read the result: ${err.message}`);
  }
}

function end(message) {
  stopJob();
  showError(message);
}

function stopJob() {
  job?.source?.close();
  $("cancel").disabled = true;
}

async function cancel() {
  if (!job) return;
  try {
    await api("DELETE", `/jobs/${job.id}`);
    setStatus("Cancel requested.");
  } catch (err) {
    showError(err.message);
  }
}

// ------------------------------------------------------------------ generation

function startGeneration() {
  gen = { pieces: [], promptLength: 0, generated: [], relevance: [], selected: -1, follow: true };
  $("sequence").replaceChildren();
  $("generation-view").hidden = false;
}

function addPrompt(pieces) {
  gen.pieces = [...pieces];
  gen.promptLength = pieces.length;
  for (const piece of pieces) {
    const span = document.createElement("span");
    span.className = "token prompt";
    span.textContent = render.display(piece);
    $("sequence").append(span);
  }
}

function addToken(data) {
  const step = data.step;
  const piece = data.text[0];
  gen.pieces.push(piece);
  gen.generated.push(piece);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "token generated";
  button.textContent = render.display(piece);
  button.dataset.step = step;
  button.setAttribute("aria-label", `generated token ${step + 1}: ${piece}`);
  button.addEventListener("click", () => select(step, true));
  button.addEventListener("focus", () => select(step, true));
  $("sequence").append(button);
  setStatus(`Generated ${gen.generated.length} token(s).`);
  if (gen.follow) select(step, false);
  else drawMatrix();
}

function addRelevance(step, values) {
  gen.relevance[step] = values;
  if (step === gen.selected) shadeSequence();
  drawMatrix();
}

/** Make ``step`` the explained token; a user's pick stops following the latest token,
 *  unless the pick is the latest. */
function select(step, byUser) {
  if (byUser) gen.follow = step === gen.generated.length - 1;
  gen.selected = step;
  for (const b of $("sequence").querySelectorAll("button.generated")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.step) === step));
  }
  shadeSequence();
  drawMatrix();
  if (job?.result) showGenerationReport();
}

function shadeSequence() {
  const values = gen.relevance[gen.selected];
  const scale = values ? render.maxAbs(values) : 1;
  $("sequence").querySelectorAll(".token").forEach((el, i) => {
    render.shade(el, values?.[i], scale);
  });
  const piece = gen.generated[gen.selected] ?? "";
  $("selected-info").textContent = values
    ? `Relevance for generated token ${gen.selected + 1} (“${piece}”).`
    : `Generated token ${gen.selected + 1} (“${piece}”): relevance not yet received.`;
}

function drawMatrix() {
  $("matrix").replaceChildren(
    render.matrix(gen.pieces, gen.promptLength, gen.generated, gen.relevance, gen.selected),
  );
}

/** Arrow keys move between generated tokens (focus selects). */
function moveFocus(event) {
  if (!["ArrowLeft", "ArrowRight"].includes(event.key)) return;
  const buttons = [...$("sequence").querySelectorAll("button.generated")];
  const at = buttons.indexOf(document.activeElement);
  if (at < 0) return;
  const next = buttons[at + (event.key === "ArrowLeft" ? -1 : 1)];
  if (next) {
    event.preventDefault();
    next.focus();
  }
}

function showGenerationReport() {
  const g = job.result.generation;
  const step = gen.selected;
  showReport(job, g.conservation_trace?.[step], job.result.timings);
}

// ------------------------------------------------------------------ classification

/** A prediction in one line: the class with its probability, the labels a multi-label
 *  classifier finds present, or a regression's value (it has no probability). */
function predictionText(prediction) {
  if (prediction.value !== undefined) {
    return `Predicted: ${prediction.label} = ${prediction.value.toPrecision(4)}`;
  }
  if (prediction.labels) return `Labels present: ${prediction.labels.join(", ") || "none"}`;
  return `Predicted: ${prediction.label} (${pct(prediction.score)})`;
}

function showClassification(result) {
  const prediction = result.predictions[0];
  $("label").textContent = predictionText(prediction);
  render.probabilities($("probabilities"), prediction.scores ?? {});
  const item = result.inputs[0];
  const rows = [];
  if (item.tokens && item.relevance) {
    const values = item.relevance.values;
    if (job.mode === "contrast" || job.mode === "reference") { // signed modes
      rows.push(render.tokenRow(item.tokens, values.map((v) => Math.max(v, 0)), "Supporting"));
      rows.push(render.tokenRow(item.tokens, values.map((v) => Math.min(v, 0)), "Opposing"));
    } else {
      rows.push(render.tokenRow(item.tokens, values, "Relevance"));
    }
  }
  $("text-tokens").replaceChildren(...rows);
  $("text-view").hidden = false;
}

/** Token classification and question answering: what was predicted (each token's label,
 *  or the answer), then one relevance row per seed (per token, or the start and the end). */
function showTokens(result) {
  const item = result.inputs[0];
  const answer = item.answer_tokens;
  $("label").textContent = answer
    ? `Answer: ${item.answer ?? answer.map(render.display).join(" ")}`
    : `Labels: ${item.tokens.map((t, i) => `${render.display(t)}/${item.labels[i]}`).join(" ")}`;
  $("probabilities").replaceChildren();
  const captions = answer
    ? item.seeds
    : item.tokens.map((t, i) => `${render.display(t)} → ${item.labels[i]}`);
  const rows = (item.relevance?.values ?? []).map((values, k) =>
    render.tokenRow(item.tokens, values, captions[k]),
  );
  $("text-tokens").replaceChildren(...rows);
  $("text-view").hidden = false;
}

/** Conservation of a result with several seeds per row ([seeds][rows]) as the report
 *  shows one: the first row's seeds added up (each seed is conserved, so is their sum). */
function seedTotals(conservation) {
  const total = (perSeed) => [perSeed.reduce((sum, rows) => sum + rows[0], 0)];
  return Object.fromEntries(Object.entries(conservation).map(([k, v]) => [k, total(v)]));
}

let picture = null; // the decoded image, kept to redraw when the opacity changes
let heatmap = null;

async function showImage(result) {
  const prediction = result.predictions[0];
  $("image-label").textContent = predictionText(prediction);
  picture = new Image();
  picture.src = `data:image/png;base64,${result.image_png_b64}`;
  await picture.decode();
  heatmap = result.inputs[0].relevance_map.values;
  $("image-view").hidden = false;
  redrawImage();
}

function redrawImage() {
  if (picture && heatmap) {
    render.drawOverlay($("overlay"), picture, heatmap, Number($("opacity").value) / 100);
  }
}

// ------------------------------------------------------------------ shared bits

function showReport(current, conservation, timings) {
  render.report($("conservation"), $("timings"), conservation, timings);
  $("heatmap-link").href = current.heatmap ?? "#";
  $("heatmap-link").hidden = !current.heatmap; // not every task has a picture
  $("report").hidden = false;
}

function reset() {
  for (const id of ["generation-view", "text-view", "image-view", "report", "error", "warnings"]) {
    $(id).hidden = true;
  }
  job = gen = picture = heatmap = null;
}

function setStatus(text) {
  $("status").textContent = text;
}

/** What the result says about the input or the model (a blank picture, an untrained head,
 *  little of the output reaching the inputs): read before the explanation. */
function showWarnings(warnings) {
  const items = warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w }));
  $("warnings").replaceChildren(...items);
  $("warnings").hidden = warnings.length === 0;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setStatus("Stopped.");
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;

/** fetch with JSON both ways; an HTTP error becomes an Error with the API's own message. */
async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(data.detail)
      ? data.detail.map((d) => d.message || d.msg).join("; ")
      : data.detail;
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return data;
}

$("model").addEventListener("change", chooseModel);
$("greedy").addEventListener("change", toggleSampling);
$("sampling").addEventListener("change", toggleSampling);
$("run-form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("opacity").addEventListener("input", redrawImage);
$("sequence").addEventListener("keydown", moveFocus);
loadModels();
