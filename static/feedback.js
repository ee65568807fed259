// Cuddle or Not: "Wrong answer?" under each answer, only where the server keeps corrections
// (GET /model says "feedback": true). Nothing is sent before the parent chooses and presses Send.
// Uses app.js's state and errorMessage, and dom.js's el.
"use strict";

// The label POST /feedback takes for a photo of none of the model's classes.
const NONE_OF_THESE = "none of these";

function className(label) {
  return state.verdicts && state.verdicts[label] ? state.verdicts[label].name : label;
}

// A "Wrong answer?" button under the answer; it opens a small form: the right class (or none of
// these), what happens to the photo in plain words, and Send or Cancel. Nothing is sent before Send.
function offerCorrection(view, photo) {
  if (!state.feedback) return;
  const n = ++state.corrections;
  const box = el("div", "correction");
  const open = el("button", "button small", "Wrong answer?");
  open.type = "button";
  open.setAttribute("aria-expanded", "false");
  const form = el("form", "correction-form");
  form.id = `correction-${n}`;
  form.hidden = true;
  open.setAttribute("aria-controls", form.id);
  const choices = el("fieldset", "choices");
  choices.append(el("legend", "", "What is in the photo?"));
  for (const [value, text] of [...state.classes.map((c) => [c, className(c)]), [NONE_OF_THESE, "None of these"]]) {
    const label = el("label", "choice");
    const radio = el("input");
    radio.type = "radio";
    radio.name = `label-${n}`;
    radio.value = value;
    radio.required = true;
    label.append(radio, el("span", "", text));
    choices.append(label);
  }
  const consent = el("p", "consent", "If you send it, this photo and your answer will be kept on this server " +
    "to improve the model. Its location, camera details and any other information in the file are removed " +
    "first; nothing else about you is kept.");
  const send = el("button", "button primary", "Send photo and answer");
  send.type = "submit";
  const cancel = el("button", "button", "Cancel");
  cancel.type = "button";
  const buttons = el("div", "buttons");
  buttons.append(send, cancel);
  const status = el("p", "correction-status");
  status.setAttribute("role", "status");
  form.append(choices, consent, buttons, status);
  box.append(open, form);
  view.body.append(box);

  // A disclosure button: it stays in place and says whether the form below it is open.
  const show = (visible) => {
    form.hidden = !visible;
    open.setAttribute("aria-expanded", String(visible));
  };
  open.addEventListener("click", () => {
    const opening = form.hidden;
    show(opening);
    if (opening) form.querySelector("input").focus();
  });
  cancel.addEventListener("click", () => {
    form.reset();
    status.textContent = "";
    show(false);
    open.focus();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = form.querySelector("input:checked");
    if (!chosen) return; // the browser's own validation asks for a choice
    send.disabled = cancel.disabled = true;
    status.textContent = "Sending…";
    try {
      const body = new FormData();
      body.append("label", chosen.value);
      if (photo.file) body.append("file", photo.file, photo.file.name || "photo.jpg");
      else body.append("url", photo.url);
      const resp = await fetch("/feedback", { method: "POST", body });
      const text = await resp.text();
      if (!resp.ok) throw new Error(errorMessage(resp.status, text));
      const kept = el("p", "correction-done", "Thank you: the photo and your answer were sent. ");
      kept.append(el("span", "reference", `To have it deleted, quote ${JSON.parse(text).id} to the people who run ` +
        "this site."));
      kept.setAttribute("role", "status");
      kept.tabIndex = -1;
      box.replaceChildren(kept);
      kept.focus();
    } catch (err) {
      status.textContent = err instanceof TypeError ? errorMessage(0, "") : err.message;
      status.setAttribute("role", "alert");
      send.disabled = cancel.disabled = false;
    }
  });
}
