// Cuddle or Not: the page a parent uses. Vanilla JS, no build step.
// Every piece of text from the server or the user is inserted with textContent, never as HTML.
"use strict";

const MAX_SIDE = 1024;            // long side of the photo we upload, in pixels
const JPEG_QUALITY = 0.85;
const KEEP_ORIGINAL_BYTES = 1.5e6; // small enough photos are uploaded untouched
const UNSURE_BELOW = 0.6;          // top probability under this: say the model is unsure

// Friendly words for the default bear model; any other model shows its own labels.
const BEAR_VERDICTS = {
  teddys: { answer: "Cuddle it!", detail: "It's a teddy bear.", cuddly: true, name: "A teddy bear" },
  grizzly: { answer: "Don't cuddle!", detail: "That's a grizzly bear.", cuddly: false, name: "A grizzly bear" },
  black: { answer: "Don't cuddle!", detail: "That's a black bear.", cuddly: false, name: "A black bear" },
};
const state = { classes: [], verdicts: null, busy: 0, feedback: false, corrections: 0 };
// $ and el come from dom.js.

// Never claim 100% or 0%: a model's probability is an estimate, not a certainty.
function percent(p) {
  if (p > 0.99 && p < 1) return ">99%";
  if (p > 0 && p < 0.01) return "<1%";
  return `${Math.round(p * 100)}%`;
}

// --- Model description -----------------------------------------------------------------------

async function loadModelInfo() {
  try {
    const resp = await fetch("/model");
    if (!resp.ok) return;
    const info = await resp.json();
    state.classes = info.classes || [];
    state.feedback = info.feedback === true;
    if (state.feedback) {
      $("privacy").textContent = "Photos are classified on this server and not stored, unless you send one " +
        "with \"Wrong answer?\".";
    }
    const isBearModel = state.classes.length === 3 && state.classes.every((c) => c in BEAR_VERDICTS);
    state.verdicts = isBearModel ? BEAR_VERDICTS : null;
    if (!isBearModel) {
      const card = info.card || {};
      const parts = [`${info.multi_label ? "Labels" : "Classes"}: ${state.classes.join(", ")}`];
      if (info.multi_label) parts.push("any number of them can apply");
      if (typeof card.valid_accuracy === "number") parts.push(`${percent(card.valid_accuracy)} validation accuracy`);
      $("model-description").textContent = parts.join(" · ");
    }
  } catch (err) {
    // The page still works without the description.
  }
}

// --- Busy state ------------------------------------------------------------------------------

function setBusy(delta) {
  state.busy += delta;
  const busy = state.busy > 0;
  for (const id of ["choose-button", "camera-button", "url-button"]) $(id).disabled = busy;
  document.body.classList.toggle("busy", busy);
}

// --- Result cards ----------------------------------------------------------------------------

function createCard(title) {
  const card = el("article", "card");
  const figure = el("div", "photo");
  const img = el("img");
  img.alt = `Photo: ${title}`;
  img.onerror = () => figure.remove(); // not something a browser can show (HEIC, or not a photo)
  figure.append(img);
  const body = el("div", "card-body");
  const name = el("p", "file-name", title);
  const status = el("p", "status", "Preparing…");
  status.setAttribute("role", "status");
  const progress = el("progress", "upload-progress");
  progress.max = 100;
  progress.value = 0;
  progress.setAttribute("aria-label", `Upload progress for ${title}`);
  body.append(name, status, progress);
  card.append(figure, body);
  $("results").prepend(card);
  return { card, img, body, status, progress };
}

// What a model with an unfamiliar-image detector says about a photo unlike those it was trained
// on. The flag means the answer cannot be vouched for, not that the photo shows a stranger: a
// parent's own teddy in a dim bedroom is flagged more often than a shop photo, so the guess is
// said too, as a guess.
function unfamiliarText(topLabel, topP) {
  const known = state.verdicts && state.verdicts[topLabel];
  const guess = `${known ? known.name.toLowerCase() : topLabel} (${percent(topP)})`;
  const learned = state.verdicts ? "the photos of bears and teddy bears I learned from"
    : `the photos I learned from (${state.classes.join(", ")})`;
  return `This photo isn't like ${learned}, so my guess may be wrong: ${guess}. Look for yourself.`;
}

function showResult(view, result) {
  view.progress.remove();
  view.status.remove();
  const predictions = result.predictions;
  const [topLabel, topP] = predictions[0];
  const verdict = el("div", "verdict");
  const known = state.verdicts && state.verdicts[topLabel];
  const bars = el("ol", "bars");
  bars.setAttribute("aria-label", "Probability of each class");
  if (result.unfamiliar === true) {
    // Never "Cuddle it!" or "Don't cuddle!" for a photo the model was not made for: its
    // probabilities are shown, but only as a secondary, labelled guess.
    view.card.classList.add("unfamiliar");
    verdict.append(el("p", "answer", "I can't be sure about this one"),
      el("p", "detail", unfamiliarText(topLabel, topP)));
    bars.setAttribute("aria-label", "What the model would guess anyway (not to be trusted for this photo)");
    bars.classList.add("secondary");
    view.body.append(verdict, el("p", "bars-caption", "If it had to guess:"));
  } else if (Array.isArray(result.labels)) {
    // A multi-label model: every label above its threshold applies, or none does.
    const labels = result.labels;
    verdict.append(el("p", "answer", labels.length ? labels.join(", ") : "None of the labels"),
      el("p", "detail", labels.length ? `${labels.length === 1 ? "This label applies" : "These labels apply"} ` +
        `(each above ${percent(result.threshold)}).` : `No label reaches ${percent(result.threshold)}.`));
    bars.setAttribute("aria-label", "Probability of each label, on its own");
  } else if (topP < UNSURE_BELOW) {
    view.card.classList.add("unsure");
    verdict.append(el("p", "answer", "Not sure"),
      el("p", "detail", `The model can't tell. Its best guess is ${topLabel} (${percent(topP)}). Try a clearer photo.`));
  } else if (known) {
    view.card.classList.add(known.cuddly ? "cuddly" : "not-cuddly");
    verdict.append(el("p", "answer", known.answer), el("p", "detail", `${known.detail} (${percent(topP)} sure)`));
  } else {
    verdict.append(el("p", "answer", topLabel), el("p", "detail", `${percent(topP)} sure`));
  }
  for (const [label, p] of predictions) {
    const item = el("li", "bar-row");
    const track = el("span", "bar-track");
    track.setAttribute("aria-hidden", "true");
    const fill = el("span", "bar-fill");
    fill.style.width = `${Math.max(0, Math.min(100, p * 100)).toFixed(1)}%`;
    track.append(fill);
    item.append(el("span", "bar-label", label), track, el("span", "bar-value", percent(p)));
    bars.append(item);
  }
  if (!verdict.isConnected) view.body.append(verdict);
  view.body.append(bars);
}

function showError(view, message) {
  view.progress.remove();
  view.card.classList.add("error");
  view.status.textContent = message;
  view.status.setAttribute("role", "alert");
}

// --- Talking to the server -------------------------------------------------------------------

function errorMessage(status, bodyText) {
  try {
    const message = JSON.parse(bodyText).error.message;
    if (message) return message;
  } catch (err) {
    // not our JSON error: fall through
  }
  if (status === 0) return "Could not reach the server. Check your connection and try again.";
  // Not from the service: a platform in front of it refusing a body over its own limit.
  if (status === 413) return "This photo is too large to send here. Try a smaller photo, or a screenshot of it.";
  return `Something went wrong (HTTP ${status}). Please try again.`;
}

// XMLHttpRequest rather than fetch: fetch cannot report upload progress.
function postPhoto(blob, filename, view) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", blob, filename);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload");
    xhr.responseType = "text";
    xhr.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      const pct = Math.round((event.loaded / event.total) * 100);
      view.progress.value = pct;
      view.status.textContent = `Uploading… ${pct}%`;
    };
    xhr.upload.onload = () => {
      view.progress.value = 100;
      view.status.textContent = "Classifying…";
    };
    xhr.onload = () => {
      if (xhr.status === 200) resolve(JSON.parse(xhr.responseText));
      else reject(new Error(errorMessage(xhr.status, xhr.responseText)));
    };
    xhr.onerror = () => reject(new Error(errorMessage(0, "")));
    xhr.send(form);
  });
}

// Phone photos are 3-12 MB; the model needs a few hundred pixels. Downscale in the browser
// (EXIF orientation applied) so the upload is ~200 KB on a slow connection.
async function downscale(file) {
  if (!file.type.startsWith("image/")) return file; // let the server explain what is wrong
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (err) {
    return file; // a format this browser cannot decode (HEIC on most): the server can
  }
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  if (scale === 1 && file.size <= KEEP_ORIGINAL_BYTES) {
    bitmap.close();
    return file;
  }
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff"; // transparent areas become white, as the server would show them
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
  if (!blob) return file;
  return new File([blob], file.name.replace(/\.[^.]*$/, "") + ".jpg", { type: "image/jpeg" });
}

async function classifyFile(file) {
  const view = createCard(file.name || "Pasted photo");
  setBusy(+1);
  try {
    const upload = await downscale(file);
    view.img.src = URL.createObjectURL(upload);
    view.status.textContent = "Uploading…";
    showResult(view, await postPhoto(upload, upload.name || "photo.jpg", view));
    offerCorrection(view, { file: upload });
  } catch (err) {
    showError(view, err.message);
  } finally {
    setBusy(-1);
  }
}

async function classifyFiles(files) {
  // One at a time: on a slow phone connection, parallel uploads only make every one slower.
  for (const file of files) await classifyFile(file);
}

async function classifyUrl(url) {
  const view = createCard(url);
  view.img.src = url;
  view.img.referrerPolicy = "no-referrer";
  view.progress.removeAttribute("value"); // indeterminate: the server is fetching
  view.status.textContent = "Fetching and classifying…";
  setBusy(+1);
  try {
    const resp = await fetch(`/classify-url?url=${encodeURIComponent(url)}`);
    const text = await resp.text();
    if (!resp.ok) throw new Error(errorMessage(resp.status, text));
    showResult(view, JSON.parse(text));
    offerCorrection(view, { url });
  } catch (err) {
    showError(view, err instanceof TypeError ? errorMessage(0, "") : err.message);
  } finally {
    setBusy(-1);
  }
}

// --- Wiring ----------------------------------------------------------------------------------

function imageFiles(list) {
  return Array.from(list || []);
}

function init() {
  const fileInput = $("file-input");
  const cameraInput = $("camera-input");
  $("choose-button").addEventListener("click", () => fileInput.click());
  $("camera-button").addEventListener("click", () => cameraInput.click());
  for (const input of [fileInput, cameraInput]) {
    input.addEventListener("change", () => {
      const files = imageFiles(input.files);
      input.value = ""; // choosing the same photo again still fires "change"
      if (files.length) classifyFiles(files);
    });
  }

  const picker = $("picker");
  picker.addEventListener("dragover", (event) => {
    event.preventDefault();
    picker.classList.add("dragging");
  });
  picker.addEventListener("dragleave", () => picker.classList.remove("dragging"));
  picker.addEventListener("drop", (event) => {
    event.preventDefault();
    picker.classList.remove("dragging");
    if (state.busy) return;
    const files = imageFiles(event.dataTransfer && event.dataTransfer.files);
    if (files.length) classifyFiles(files);
  });
  // Dropping a photo anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  document.addEventListener("paste", (event) => {
    if (state.busy || event.target === $("url-input")) return;
    const files = imageFiles(event.clipboardData && event.clipboardData.files);
    if (files.length) {
      event.preventDefault();
      classifyFiles(files);
    }
  });

  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("url-input");
    const url = input.value.trim();
    if (!url || state.busy) return; // the browser's own validation explains an empty field
    classifyUrl(url);
  });

  loadModelInfo();
}

init();
