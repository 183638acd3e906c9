"use strict";
// The annotation page's little script: keyboard shortcuts, the refinement editor's "Run tests", the lease clock.
(function () {
  const csrf = document.body.dataset.csrf;
  const answer = document.getElementById("answer");
  const skip = document.getElementById("skip");
  const editor = document.getElementById("refinement");
  const attach = document.getElementById("attach");
  const run = document.getElementById("run");
  const next = document.getElementById("take-next");

  function typing(event) {
    const tag = event.target.tagName;
    return tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT";
  }

  document.addEventListener("keydown", (event) => {
    if (answer && (event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      answer.requestSubmit();
    } else if (skip && event.altKey && event.code === "KeyS") {
      event.preventDefault();
      skip.requestSubmit();
    } else if (run && event.altKey && event.code === "KeyR") {
      event.preventDefault();
      runTests();
    } else if (next && !typing(event) && !event.ctrlKey && !event.altKey && !event.metaKey && event.key === "n") {
      window.location.assign(next.href);
    }
  });

  // A form is sent once, however often the key is pressed.
  for (const form of [answer, skip]) {
    if (form) {
      form.addEventListener("submit", (event) => {
        if (form.dataset.sent) { event.preventDefault(); return; }
        form.dataset.sent = "1";
      });
    }
  }

  if (editor) {
    editor.addEventListener("keydown", (event) => {
      if (event.key === "Tab" && !event.shiftKey && !event.ctrlKey && !event.altKey && !event.metaKey) {
        event.preventDefault();
        editor.setRangeText("    ", editor.selectionStart, editor.selectionEnd, "end");
        editor.dispatchEvent(new Event("input"));
      }
    });
    // Editing the program means proposing it; the box can still be unticked.
    editor.addEventListener("input", () => { attach.checked = editor.value !== editor.defaultValue; });
  }
  // A refusal is about what was sent: it goes once the annotator changes the feedback or the program.
  const refused = document.getElementById("refused");
  for (const box of [editor, document.getElementById("feedback")]) {
    if (box && refused) { box.addEventListener("input", () => refused.remove(), {once: true}); }
  }
  if (run) { run.addEventListener("click", runTests); }

  async function runTests() {
    const status = document.getElementById("run-status");
    const results = document.getElementById("run-results");
    run.disabled = true;
    status.textContent = "running the tests in the sandbox…";
    status.className = "hint";
    results.replaceChildren();
    try {
      const reply = await fetch(run.dataset.url, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify({program: editor.value}),
      });
      const body = await reply.json();
      if (!reply.ok) {
        status.textContent = body.error || `the service answered ${reply.status}`;
        status.className = "error";
        return;
      }
      const passed = body.tests.filter((t) => t.verdict === "PASSED").length;
      status.textContent = body.load_error ? `the program does not load: ${body.load_error}`
        : body.passed ? `passes all ${body.tests.length} tests` : `passes ${passed} of ${body.tests.length} tests`;
      status.className = body.passed ? "passed" : "failed";
      results.innerHTML = body.html;   // rendered and escaped by the server, like the tests above
    } catch (error) {
      status.textContent = `could not run the tests: ${error}`;
      status.className = "error";
    } finally {
      run.disabled = false;
    }
  }

  const lease = document.querySelector("[data-lease-expires]");
  if (lease) {
    const expires = Number(lease.dataset.leaseExpires) * 1000;
    const tick = () => {
      const left = Math.round((expires - Date.now()) / 1000);
      if (left > 0) {
        lease.textContent = `yours for ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
        setTimeout(tick, 1000);
      } else {
        lease.textContent = "your lease has expired: submitting still works until someone else takes the item";
        lease.className = "warn";
      }
    };
    tick();
  }
})();
