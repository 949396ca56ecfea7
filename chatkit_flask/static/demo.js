/* The demo page's script (kept out of the HTML so the page works under a strict CSP). */
(function () {
  "use strict";

  var CDN_TIMEOUT_MS = 10000;
  var script = document.currentScript;
  var backend = (script && script.getAttribute("data-backend")) || "hosted";
  var prefix = (script && script.getAttribute("data-prefix")) || "/api/chatkit";
  var endpoint = (script && script.getAttribute("data-endpoint")) || prefix + "/secret";
  var statusBox = document.getElementById("status");
  var chat = document.getElementById("chat");
  var unavailable = document.getElementById("chat-unavailable");
  var Helper = window.ChatKitFlask;

  function showStatus(kind, text) {
    statusBox.setAttribute("data-kind", kind);
    statusBox.textContent = text;
  }

  function describe(err) {
    var text = (err && err.message) || String(err);
    if (err && err.requestId) {
      text += "\n(request id " + err.requestId + ")";
    }
    return text;
  }

  if (!Helper) {
    showStatus("error", "chatkit-secret.js did not load, so this page cannot configure the chat.");
    return;
  }

  // --- the chat: one call of the helper configures <openai-chatkit> for either backend -------
  var chatReady = false;
  var apiReady = Helper.configure({
    prefix: prefix,
    onError: function (err) {
      showStatus("error", describe(err));
    },
  }).then(function (api) {
    if (!api.getClientSecret) {
      return api;
    }
    var getClientSecret = api.getClientSecret;
    return {
      getClientSecret: async function (currentClientSecret) {
        try {
          var secret = await getClientSecret(currentClientSecret);
          showStatus("ok", currentClientSecret ? "Chat session refreshed." : "Chat session started.");
          return secret;
        } catch (err) {
          showStatus("error", "The chat could not start: " + describe(err));
          throw err;
        }
      },
    };
  });
  apiReady.catch(function (err) {
    showStatus("error", "The chat could not start: " + describe(err));
  });

  function componentUnavailable() {
    if (chatReady || !unavailable.hidden) {
      return;
    }
    unavailable.hidden = false;
    chat.hidden = true;
    showStatus(
      "warning",
      backend === "server"
        ? "The ChatKit widget could not load from OpenAI's CDN (offline or blocked): the widget's " +
            "script always comes from OpenAI. This app's chat endpoint works: try it below."
        : "The ChatKit web component could not load (offline or no access to OpenAI): " +
            "the chat itself needs OpenAI's service. You can still mint test secrets below."
    );
  }

  function mount() {
    if (chatReady) {
      return;
    }
    chatReady = true;
    unavailable.hidden = true;
    chat.hidden = false;
    chat.addEventListener("chatkit.error", function (event) {
      var error = event.detail && event.detail.error;
      showStatus("error", "Chat error: " + describe(error));
    });
    apiReady.then(async function (api) {
      var options = { api: api };
      if (backend === "server") {
        options.onClientTool = answerClientTool; // the demo agent's get_page_info
      }
      if (api.uploadStrategy) {
        // Attachments are on: the composer shows the upload button with the server's limits.
        try {
          var config = await (await fetch(prefix + "/config", { cache: "no-store" })).json();
          options.composer = { attachments: config.attachments };
        } catch (err) {
          showStatus("warning", "Attachments are off on this page: " + describe(err));
        }
      }
      chat.setOptions(options);
      if (backend === "server") {
        showStatus("ok", "Chat ready: this app answers it (" + api.url + ").");
      }
    });
  }

  // Script load errors do not bubble, but a capturing listener on the document sees them.
  document.addEventListener(
    "error",
    function (event) {
      if (event.target && event.target.id === "chatkit-cdn") {
        componentUnavailable();
      }
    },
    true
  );
  if (window.customElements && customElements.get("openai-chatkit")) {
    mount();
  } else if (window.customElements) {
    customElements.whenDefined("openai-chatkit").then(mount);
    setTimeout(function () {
      if (!chatReady) {
        componentUnavailable();
      }
    }, CDN_TIMEOUT_MS);
  } else {
    componentUnavailable();
  }

  window.chatkitDemo = { api: apiReady, answerClientTool: answerClientTool };
  if (backend === "server") {
    tryWithoutWidget();
  } else {
    secretFlow();
  }

  // --- server mode: the endpoint without the widget ---------------------------------------------
  // Shows what the stream carries: the assistant's text as it streams, widgets (drawn plainly:
  // text and buttons), and a widget button's action sent back as threads.custom_action.
  function tryWithoutWidget() {
    var form = document.getElementById("try-form");
    var input = document.getElementById("try-input");
    var send = document.getElementById("try-send");
    var transcript = document.getElementById("transcript");
    var threadId = null;
    var lines = {}; // item id -> its <li>

    function line(who, text, before) {
      var item = document.createElement("li");
      item.setAttribute("data-who", who);
      item.textContent = text;
      transcript.insertBefore(item, before || null);
      return item;
    }

    function drawWidget(node, itemId) {
      var el;
      if (node.type === "Button") {
        el = document.createElement("button");
        el.type = "button";
        el.textContent = node.label || "";
        var action = node.onClickAction;
        if (action && action.handler !== "client") {
          el.addEventListener("click", function () {
            runAction(itemId, action);
          });
        } else {
          el.disabled = true;
        }
      } else if (typeof node.value === "string") {
        el = document.createElement(node.type === "Title" ? "strong" : "span");
        el.textContent = node.value;
      } else {
        el = document.createElement("div");
      }
      el.className = "widget-" + String(node.type || "box").toLowerCase();
      (node.children || []).forEach(function (child) {
        el.appendChild(drawWidget(child, itemId));
      });
      return el;
    }

    function showWidget(item, before) {
      var shown = lines[item.id] || line("widget", "", before);
      shown.textContent = "";
      shown.setAttribute("data-item-id", item.id);
      shown.appendChild(drawWidget(item.widget, item.id));
      lines[item.id] = shown;
    }

    function fullText(item) {
      return (item.content || []).map(function (part) { return part.text || ""; }).join("");
    }

    // One handler for every stream; `pending` is the placeholder of the reply to a message.
    function handler(pending) {
      return function (ev) {
        var item = ev.item;
        if (ev.type === "thread.created") {
          threadId = ev.thread.id;
        } else if (ev.type === "thread.item.added" && item.type === "assistant_message") {
          lines[item.id] = pending.line && !pending.bound ? pending.line : line("assistant", "");
          pending.bound = true;
        } else if (ev.type === "thread.item.updated" && ev.update && typeof ev.update.delta === "string") {
          (lines[ev.item_id] || pending.line).textContent += ev.update.delta;
        } else if ((ev.type === "thread.item.done" || ev.type === "thread.item.replaced") && item.type === "widget") {
          showWidget(item, pending.bound ? null : pending.line);
        } else if (ev.type === "thread.item.done" && item.type === "assistant_message") {
          (lines[item.id] || line("assistant", "")).textContent = fullText(item);
        } else if (ev.type === "error") {
          var shown = pending.line && !pending.bound ? pending.line : line("error", "");
          shown.setAttribute("data-who", "error");
          shown.textContent = ev.message || "The reply failed.";
          pending.failed = true;
        }
      };
    }

    async function runAction(itemId, action) {
      var card = lines[itemId];
      card.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
      var pending = { line: null, bound: false, failed: false };
      try {
        var api = await apiReady;
        await Helper.send(api, "threads.custom_action", {
          thread_id: threadId,
          item_id: itemId,
          action: { type: action.type, payload: action.payload },
        }, { onEvent: handler(pending) });
        if (!pending.failed) {
          showStatus("ok", "Action " + action.type + " answered by " + api.url + ".");
        }
      } catch (err) {
        line("error", describe(err));
        showStatus("error", describe(err));
      }
    }

    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      var text = input.value.trim();
      if (!text) {
        return;
      }
      input.value = "";
      send.disabled = true;
      line("you", text);
      var pending = { line: line("assistant", ""), bound: false, failed: false };
      var params = {
        input: { content: [{ type: "input_text", text: text }], attachments: [], inference_options: {} },
      };
      if (threadId) {
        params.thread_id = threadId;
      }
      try {
        var api = await apiReady;
        await Helper.send(api, threadId ? "threads.add_user_message" : "threads.create", params, {
          onEvent: handler(pending),
        });
        if (!pending.failed) {
          showStatus("ok", "Reply streamed from " + api.url + ".");
        }
      } catch (err) {
        pending.failed = true;
        pending.line.setAttribute("data-who", "error");
        pending.line.textContent = describe(err);
        showStatus("error", describe(err));
      } finally {
        if (!pending.bound && !pending.failed) {
          pending.line.remove(); // the answer was a widget only
        }
        send.disabled = false;
      }
    });
  }

  // --- hosted mode: the secret flow without the web component -----------------------------------
  function secretFlow() {
    var mintButton = document.getElementById("mint");
    var mintedList = document.getElementById("minted");
    var lastInfo = null;
    var currentSecret = null;
    var buttonFetcher = Helper.createClientSecretFetcher({
      endpoint: endpoint,
      onSecret: function (info) {
        lastInfo = info;
      },
    });

    function mask(secret) {
      return secret.slice(0, 8) + "\u2026";
    }

    function expiry(expiresAt) {
      if (typeof expiresAt !== "number") {
        return "expires_at unknown";
      }
      var left = Math.max(0, Math.round(expiresAt - Date.now() / 1000));
      return "expires_at " + expiresAt + " (" + new Date(expiresAt * 1000).toLocaleTimeString() + ", in " + left + " s)";
    }

    mintButton.addEventListener("click", async function () {
      mintButton.disabled = true;
      showStatus("info", currentSecret ? "Refreshing: minting a new secret\u2026" : "Minting a secret\u2026");
      try {
        lastInfo = null;
        var secret = await buttonFetcher(currentSecret);
        var refreshed = currentSecret !== null;
        currentSecret = secret;
        var text = mask(secret) + "  " + expiry(lastInfo && lastInfo.expiresAt) + (refreshed ? "  (refresh)" : "");
        var item = document.createElement("li");
        item.textContent = text;
        mintedList.appendChild(item);
        showStatus("ok", "Minted " + text);
      } catch (err) {
        showStatus("error", describe(err));
      } finally {
        mintButton.disabled = false;
      }
    });
    window.chatkitDemo.getClientSecret = buttonFetcher;
  }

  // --- server mode: the demo agent's client tool -----------------------------------------------
  // When a reply ends on a client tool call, chatkit-js calls onClientTool({name, params}) and
  // sends what it returns back (threads.add_client_tool_output); the run then continues. The list
  // shows what the page was asked and what it answered.
  function answerClientTool(call) {
    var name = String((call && call.name) || "");
    var result;
    if (name === "get_page_info") {
      var zone = "";
      try {
        zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
      } catch (_err) {
        zone = "";
      }
      result = {
        title: document.title,
        path: window.location.pathname, // not the query string: it may hold what the site keeps private
        language: navigator.language || "",
        localTime: new Date().toString(),
        timeZone: zone,
      };
    } else {
      result = { error: "This page has no client tool named " + name + "." };
    }
    var calls = document.getElementById("client-tool-calls");
    if (calls) {
      var item = document.createElement("li");
      item.setAttribute("data-who", "client-tool");
      item.textContent = name + "(" + JSON.stringify((call && call.params) || {}) + ") \u2192 " + JSON.stringify(result);
      calls.appendChild(item);
    }
    showStatus("info", "The assistant asked this page for " + name + "; the answer goes back to the chat.");
    return result;
  }
})();
