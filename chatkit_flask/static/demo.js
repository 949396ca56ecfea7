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
    apiReady.then(function (api) {
      chat.setOptions({ api: api });
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

  window.chatkitDemo = { api: apiReady };
  if (backend === "server") {
    tryWithoutWidget();
  } else {
    secretFlow();
  }

  // --- server mode: the endpoint without the widget ---------------------------------------------
  function tryWithoutWidget() {
    var form = document.getElementById("try-form");
    var input = document.getElementById("try-input");
    var send = document.getElementById("try-send");
    var transcript = document.getElementById("transcript");
    var threadId = null;

    function line(who, text) {
      var item = document.createElement("li");
      item.setAttribute("data-who", who);
      item.textContent = text;
      transcript.appendChild(item);
      return item;
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
      var reply = line("assistant", "");
      var params = {
        input: { content: [{ type: "input_text", text: text }], attachments: [], inference_options: {} },
      };
      if (threadId) {
        params.thread_id = threadId;
      }
      try {
        var api = await apiReady;
        await Helper.send(api, threadId ? "threads.add_user_message" : "threads.create", params, {
          onEvent: function (ev) {
            if (ev.type === "thread.created") {
              threadId = ev.thread.id;
            } else if (ev.type === "thread.item.updated" && ev.update && typeof ev.update.delta === "string") {
              reply.textContent += ev.update.delta;
            } else if (ev.type === "error") {
              reply.setAttribute("data-who", "error");
              reply.textContent = ev.message || "The reply failed.";
            }
          },
        });
        if (reply.getAttribute("data-who") === "assistant") {
          showStatus("ok", "Reply streamed from " + api.url + ".");
        }
      } catch (err) {
        reply.setAttribute("data-who", "error");
        reply.textContent = describe(err);
        showStatus("error", describe(err));
      } finally {
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
})();
