// The version page's "Try it" panel (templates/admin/finetuning/modelversion/playground.html).
// One request per column, each answered as JSON lines ({"chunk"}, then {"done"} or {"error"}),
// so every column shows its own progress and a slow model never holds the others.
"use strict";
(function () {
  const panel = document.getElementById("playground");
  const dataNode = document.getElementById("playground-data");
  if (!panel || !dataNode) return;
  const data = JSON.parse(dataNode.textContent);
  const $ = (id) => document.getElementById(id);
  const generateButton = $("pg-generate");
  const stopButton = $("pg-stop");
  const status = $("pg-status");
  const LIST_KEYS = ["features", "keywords"];
  const KNOWN_KEYS = Array.from(panel.querySelectorAll("[data-pg-attribute]")).map((el) => el.dataset.pgAttribute);
  let controller = null;
  let reference = null; // {id, description} of the example the form was filled from

  function csrfToken() {
    const input = $("pg-csrf") || document.querySelector("input[name=csrfmiddlewaretoken]");
    if (input && input.value) return input.value;
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function cell(column, name) {
    return panel.querySelector(`[data-pg-column="${column}"][data-pg-cell="${name}"]`);
  }

  function setText(node, text, className) {
    node.textContent = text;
    node.className = className || "";
  }

  // --- Errors, shown above their field as the admin shows a form's ---------------------------

  function clearErrors() {
    panel.querySelectorAll("ul.errorlist").forEach((list) => {
      list.replaceChildren();
      list.hidden = true;
      const row = list.closest(".form-row");
      if (row) row.classList.remove("errors");
    });
  }

  function errorTarget(name) {
    const exact = panel.querySelector(`[data-pg-errors="${name}"]`);
    if (exact) return exact;
    const parts = name.split(".");
    if (parts[0] === "product" && parts.length > 1) {
      const known = panel.querySelector(`[data-pg-errors="product.${parts[1]}"]`);
      return known || panel.querySelector('[data-pg-errors="other"]');
    }
    return panel.querySelector('[data-pg-errors="product"]');
  }

  function showErrors(errors) {
    for (const [name, messages] of Object.entries(errors)) {
      const list = errorTarget(name);
      const shown = name.startsWith("product.") ? name.slice("product.".length) : name;
      for (const message of messages) {
        const item = document.createElement("li");
        item.textContent = list.dataset.pgErrors === name ? message : `${shown}: ${message}`;
        list.appendChild(item);
      }
      list.hidden = false;
      const row = list.closest(".form-row");
      if (row) row.classList.add("errors");
    }
    const first = panel.querySelector("ul.errorlist:not([hidden])");
    if (first) first.scrollIntoView({ block: "center", behavior: "smooth" });
  }

  // --- The request, from the form ----------------------------------------------------------------

  function requestBody() {
    const errors = {};
    const product = {};
    panel.querySelectorAll("[data-pg-attribute]").forEach((input) => {
      const key = input.dataset.pgAttribute;
      if ("pgLines" in input.dataset) {
        const lines = input.value.split("\n").map((line) => line.trim()).filter(Boolean);
        if (lines.length) product[key] = lines;
      } else if (input.value.trim()) {
        product[key] = input.value;
      }
    });
    const other = $("pg-other").value.trim();
    if (other) {
      let parsed = null;
      try {
        parsed = JSON.parse(other);
      } catch (exc) {
        errors.other = [`not valid JSON: ${exc.message}`];
      }
      if (parsed !== null && (typeof parsed !== "object" || Array.isArray(parsed))) {
        errors.other = ["must be a JSON object"];
      } else if (parsed) {
        const clash = Object.keys(parsed).filter((key) => KNOWN_KEYS.includes(key));
        if (clash.length) errors.other = [`use the fields above for ${clash.join(", ")}`];
        Object.assign(product, parsed);
      }
    }
    const body = { product };
    panel.querySelectorAll("[data-pg-param]").forEach((input) => {
      const name = input.dataset.pgParam;
      if (input.type === "checkbox") body[name] = input.checked;
      else if (input.validity.badInput) errors[name] = ["Enter a number."];
      else if (input.value.trim() !== "") body[name] = Number(input.value);
    });
    return { body, errors };
  }

  // --- Filling the form from an example ---------------------------------------------------------

  function fill(example) {
    clearErrors();
    const attributes = { ...example.attributes };
    panel.querySelectorAll("[data-pg-attribute]").forEach((input) => {
      const key = input.dataset.pgAttribute;
      const value = attributes[key];
      delete attributes[key];
      if (value === undefined || value === null) input.value = "";
      else input.value = Array.isArray(value) ? value.join("\n") : String(value);
    });
    $("pg-other").value = Object.keys(attributes).length ? JSON.stringify(attributes) : "";
    reference = { id: example.id, description: example.description };
    showReference();
    if (!controller) {
      // The outputs on the page were written for other attributes: do not leave them beside this reference.
      data.columns.forEach((column, index) => {
        columnReset(index);
        cell(index, "output").replaceChildren(
          Object.assign(document.createElement("span"), { className: "pg-empty", textContent: "Not generated yet." })
        );
      });
    }
  }

  function showReference() {
    panel.querySelectorAll(".pg-reference").forEach((node) => {
      node.hidden = !reference;
    });
    if (!reference) return;
    $("pg-reference-text").textContent = reference.description;
    const source = $("pg-reference-source");
    source.textContent = `example ${reference.id}`;
    source.href = data.example_page_url.replace("/0/", `/${reference.id}/`);
  }

  const select = $("pg-example");
  if (select) {
    select.addEventListener("change", () => {
      const example = data.examples.find((row) => String(row.id) === select.value);
      if (example) fill(example);
    });
  }

  async function loadExample() {
    const input = $("pg-example-id");
    const error = $("pg-example-error");
    error.replaceChildren();
    error.hidden = true;
    const id = parseInt(input.value, 10);
    if (!(id > 0)) {
      error.appendChild(Object.assign(document.createElement("li"), { textContent: "Enter an example id." }));
      error.hidden = false;
      return;
    }
    const response = await fetch(data.example_url.replace("/0/", `/${id}/`), {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    });
    const answer = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    if (!response.ok) {
      error.appendChild(Object.assign(document.createElement("li"), { textContent: answer.error || response.statusText }));
      error.hidden = false;
      return;
    }
    if (select) select.value = "";
    fill(answer);
  }

  const loadButton = $("pg-example-load");
  if (loadButton) loadButton.addEventListener("click", loadExample);

  // --- Generating, one request per column -------------------------------------------------------

  function seconds(ms) {
    return ms === null || ms === undefined ? "–" : `${(ms / 1000).toFixed(2)} s`;
  }

  function columnReset(index) {
    setText(cell(index, "output"), "");
    for (const name of ["finish", "tokens", "time", "speed", "log"]) setText(cell(index, name), "–");
  }

  function logLink(node, url, label) {
    if (!url) {
      setText(node, "not recorded (the generation log is off)", "pg-muted");
      return;
    }
    node.replaceChildren(Object.assign(document.createElement("a"), { href: url, textContent: label }));
  }

  function columnError(index, message, logUrl) {
    const output = cell(index, "output");
    output.replaceChildren(
      Object.assign(document.createElement("p"), { className: "errornote pg-error", textContent: message })
    );
    setText(cell(index, "finish"), "error");
    if (logUrl) logLink(cell(index, "log"), logUrl, "In the generation log");
  }

  async function runColumn(index, column, body, signal, maxTokens) {
    columnReset(index);
    const output = cell(index, "output");
    const progress = Object.assign(document.createElement("div"), { className: "pg-progress" });
    const bar = Object.assign(document.createElement("progress"), { max: maxTokens, value: 0 });
    const label = Object.assign(document.createElement("span"), { textContent: "loading the model or waiting for a place…" });
    progress.append(bar, " ", label);
    const text = Object.assign(document.createElement("div"), { className: "pg-text" });
    output.append(progress, text);
    bar.removeAttribute("value"); // indeterminate until the first token
    const started = performance.now();
    const ticker = setInterval(() => {
      const elapsed = ((performance.now() - started) / 1000).toFixed(1);
      label.textContent = label.textContent.replace(/ \([\d.]+ s\)$/, "") + ` (${elapsed} s)`;
    }, 250);
    try {
      const response = await fetch(column.url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(), Accept: "application/x-ndjson" },
        credentials: "same-origin",
        body: JSON.stringify(body),
        signal,
      });
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || !type.startsWith("application/x-ndjson")) {
        if (response.redirected || type.startsWith("text/html")) {
          columnError(index, "Your session has ended: reload the page and log in again.");
          return "failed";
        }
        const answer = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
        if (answer.errors) {
          output.replaceChildren(
            Object.assign(document.createElement("p"), { className: "pg-muted", textContent: "Not generated: see the fields marked above." })
          );
          return { errors: answer.errors };
        }
        const retry = response.headers.get("Retry-After");
        columnError(index, (answer.error || response.statusText) + (retry ? ` (try again in ${retry} s)` : ""));
        return "failed";
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      let outcome = "failed";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline);
          buffered = buffered.slice(newline + 1);
          if (!line.trim()) continue;
          const event = JSON.parse(line);
          if ("started" in event) {
            label.textContent = `queued or generating (the prompt is ${event.started.prompt_tokens} tokens)…`;
          } else if ("chunk" in event) {
            text.textContent += event.chunk;
            bar.value = event.tokens;
            label.textContent = `generating: ${event.tokens} of at most ${maxTokens} tokens`;
          } else if ("done" in event) {
            const answer = event.done;
            progress.remove();
            text.textContent = answer.text;
            if (!answer.text) text.replaceChildren(Object.assign(document.createElement("span"), { className: "pg-muted", textContent: "(empty)" }));
            setText(cell(index, "finish"), answer.finish_reason === "length" ? "length (cut off at max new tokens)" : answer.finish_reason);
            const usage = answer.usage;
            setText(cell(index, "tokens"), `${usage.completion_tokens} new, ${usage.prompt_tokens} in the prompt`);
            const timings = answer.timings;
            setText(
              cell(index, "time"),
              `${seconds(timings.total_ms)} (first token ${seconds(timings.first_token_ms)}, load ${seconds(timings.load_ms)})`
            );
            setText(cell(index, "speed"), timings.tokens_per_second === null ? "–" : String(timings.tokens_per_second));
            logLink(cell(index, "log"), answer.log_url, answer.seed === null ? "Rate it" : `Rate it (seed ${answer.seed})`);
            outcome = "done";
          } else if ("error" in event) {
            progress.remove();
            columnError(index, event.error, event.log_url);
            if (text.textContent) output.append(text);
          }
        }
      }
      if (outcome !== "done" && !output.querySelector(".pg-error")) columnError(index, "The answer ended early: the server closed the connection.");
      return outcome;
    } catch (exc) {
      if (exc.name === "AbortError") {
        progress.remove();
        output.prepend(Object.assign(document.createElement("p"), { className: "pg-muted", textContent: "Stopped." }));
        setText(cell(index, "finish"), "stopped");
        return "stopped";
      }
      columnError(index, `The request failed: ${exc.message}`);
      return "failed";
    } finally {
      clearInterval(ticker);
    }
  }

  async function generate() {
    clearErrors();
    const { body, errors } = requestBody();
    if (Object.keys(errors).length) {
      showErrors(errors);
      status.textContent = "Fix the fields marked above.";
      return;
    }
    generateButton.disabled = true;
    status.textContent = "Checking…";
    // Checked once, before any column starts: a mistake shows once, and the outputs on the page stay.
    let check;
    try {
      const response = await fetch(data.check_url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(), Accept: "application/json" },
        credentials: "same-origin",
        body: JSON.stringify(body),
      });
      check = response.headers.get("Content-Type") === "application/json" ? await response.json() : null;
      if (!check) throw new Error(response.redirected ? "your session has ended: reload the page and log in again" : `the server answered ${response.status}`);
    } catch (exc) {
      generateButton.disabled = false;
      status.textContent = `Not generated: ${exc.message}.`;
      return;
    }
    if (check.errors && Object.keys(check.errors).length) {
      generateButton.disabled = false;
      showErrors(check.errors);
      status.textContent = "Fix the fields marked above.";
      return;
    }
    controller = new AbortController();
    stopButton.disabled = false;
    status.textContent = "Generating…";
    const maxInput = panel.querySelector('[data-pg-param="max_new_tokens"]');
    const maxTokens = Number(body.max_new_tokens || maxInput.dataset.pgDefault);
    const outcomes = await Promise.all(
      data.columns.map((column, index) => runColumn(index, column, body, controller.signal, maxTokens))
    );
    generateButton.disabled = false;
    stopButton.disabled = true;
    controller = null;
    const invalid = outcomes.find((outcome) => outcome && outcome.errors);
    if (invalid) {
      showErrors(invalid.errors);
      status.textContent = "Fix the fields marked above.";
      return;
    }
    const done = outcomes.filter((outcome) => outcome === "done").length;
    status.textContent = `${done} of ${outcomes.length} answered.`;
  }

  generateButton.addEventListener("click", generate);
  stopButton.addEventListener("click", () => controller && controller.abort());
  $("pg-reset").addEventListener("click", () => {
    panel.querySelectorAll("[data-pg-attribute], #pg-other").forEach((input) => {
      input.value = "";
    });
    panel.querySelectorAll("[data-pg-param]").forEach((input) => {
      if (input.type === "checkbox") input.checked = input.dataset.pgDefault === "true";
      else input.value = input.dataset.pgDefault || "";
    });
    if (select) select.value = "";
    reference = null;
    showReference();
    clearErrors();
  });
  // The panel sits inside the version's change form: Enter must generate, not submit that form.
  panel.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.tagName === "INPUT") {
      event.preventDefault();
      if (event.target.id === "pg-example-id") loadExample();
      else if (!generateButton.disabled) generate();
    }
  });

  if (data.preset) fill(data.preset);
})();
