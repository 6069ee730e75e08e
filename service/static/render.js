// Drawing only: colours for relevance, token rows, the generation matrix, the image overlay
// and the report panel. No state and no network here; app.js owns both.

const POSITIVE = [214, 39, 40]; // supports the output
const NEGATIVE = [31, 119, 180]; // opposes it (contrast mode)

/** Largest absolute value, so each view is scaled to its own strongest evidence. */
export function maxAbs(values) {
  return values.reduce((m, v) => Math.max(m, Math.abs(v)), 0) || 1;
}

/** An rgba colour for one relevance value, its alpha proportional to |value| / scale. */
export function colour(value, scale) {
  const [r, g, b] = value < 0 ? NEGATIVE : POSITIVE;
  const alpha = Math.min(1, Math.abs(value) / scale) * 0.85;
  return `rgba(${r}, ${g}, ${b}, ${alpha.toFixed(3)})`;
}

/** Whitespace made visible, so a space or newline token still has something to shade. */
export function display(piece) {
  if (piece === "") return "∅";
  return piece.replace(/\n/g, "⏎").replace(/^ | $/g, "·");
}

/** Shade one token element; the value is kept in a data attribute and spoken in its title. */
export function shade(el, value, scale) {
  if (value === undefined) {
    el.style.backgroundColor = "";
    el.removeAttribute("data-relevance");
    el.title = "";
    return;
  }
  el.style.backgroundColor = colour(value, scale);
  el.dataset.relevance = value.toPrecision(4);
  el.title = `relevance ${value.toPrecision(4)}`;
}

/** A row of shaded token spans (text classification). */
export function tokenRow(tokens, values, caption) {
  const row = document.createElement("p");
  row.className = "tokens";
  row.setAttribute("aria-label", caption);
  const heading = document.createElement("span");
  heading.className = "row-caption";
  heading.textContent = values.some((v) => v !== 0) ? caption : `${caption} (none)`;
  row.append(heading);
  const scale = maxAbs(values);
  tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = display(token);
    shade(span, values[i], scale);
    row.append(span);
  });
  return row;
}

/** Earlier tokens (rows) by generated tokens (columns); cell = relevance of the row's token
 *  for the column's token, each column scaled to its own maximum. */
export function matrix(pieces, promptLength, generated, relevance, selected) {
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.append(cell("th", ""));
  generated.forEach((piece, step) => {
    const th = cell("th", display(piece));
    th.scope = "col";
    if (step === selected) th.className = "selected";
    head.append(th);
  });
  const body = table.createTBody();
  const scales = generated.map((_, step) => (relevance[step] ? maxAbs(relevance[step]) : 1));
  pieces.slice(0, promptLength + generated.length - 1).forEach((piece, row) => {
    const tr = body.insertRow();
    if (row === promptLength) tr.className = "first-generated";
    const th = cell("th", display(piece));
    th.scope = "row";
    tr.append(th);
    generated.forEach((_, step) => {
      const td = cell("td", "");
      const values = relevance[step];
      if (values && row < values.length) shade(td, values[row], scales[step]);
      if (step === selected) td.classList.add("selected");
      tr.append(td);
    });
  });
  return table;
}

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

/** Probabilities as a small table of bars. */
export function probabilities(table, scores) {
  table.replaceChildren();
  for (const [label, p] of Object.entries(scores)) {
    const row = table.insertRow();
    row.insertCell().textContent = label;
    const bar = document.createElement("meter");
    bar.min = 0;
    bar.max = 1;
    bar.value = p;
    bar.setAttribute("aria-label", `probability of ${label}`);
    row.insertCell().append(bar);
    row.insertCell().textContent = `${(100 * p).toFixed(1)}%`;
  }
}

/** The model's view of the image, scaled up without smoothing, and the relevance map over
 *  it. Zero relevance is transparent, so only evidence tints the picture. */
export function drawOverlay(canvas, picture, map, opacity) {
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const rows = map.length;
  const cols = map[0].length;
  const heat = new ImageData(cols, rows);
  const scale = maxAbs(map.flat());
  map.flat().forEach((v, i) => {
    const rgb = v < 0 ? NEGATIVE : POSITIVE;
    heat.data.set([...rgb, Math.round(255 * Math.min(1, Math.abs(v) / scale))], 4 * i);
  });
  const layer = document.createElement("canvas");
  layer.width = cols;
  layer.height = rows;
  layer.getContext("2d").putImageData(heat, 0, 0);
  ctx.globalAlpha = opacity;
  ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
}

/** Conservation (seed = inputs + sinks) and timings, as definition lists. */
export function report(conservationList, timingsList, conservation, timings) {
  conservationList.replaceChildren();
  if (conservation) {
    const [seed, inputs, sinks] = ["seed", "inputs", "sinks"].map((k) => conservation[k][0]);
    const gap = seed ? (100 * (inputs + sinks - seed)) / seed : 0;
    define(conservationList, "seed", seed.toPrecision(5));
    define(conservationList, "at the inputs", inputs.toPrecision(5));
    define(conservationList, "sinks (biases, constants)", sinks.toPrecision(5));
    define(conservationList, "inputs + sinks − seed", `${gap.toFixed(3)}% of the seed`);
  } else {
    define(conservationList, "conservation", "not available for this step");
  }
  timingsList.replaceChildren();
  for (const [name, value] of Object.entries(timings || {})) {
    if (value === null) continue;
    define(timingsList, name.replace(/_s$/, "").replace(/_/g, " "), timingText(value));
  }
}

/** A timing as people read it: seconds as ms, a batch as "2 jobs, 3 rows", never
 * "[object Object]". */
function timingText(value) {
  if (typeof value === "number") return `${(1000 * value).toFixed(1)} ms`;
  if (value && typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${v} ${k}`)
      .join(", ");
  }
  return String(value);
}

function define(list, term, value) {
  list.append(cell("dt", term), cell("dd", value));
}
