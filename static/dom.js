// Helpers shared by the pages (app.js, clean.js). Text always goes in as textContent, never as
// HTML: labels and file names come from the server, and often from the internet before that.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
