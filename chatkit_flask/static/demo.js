/* The demo page's script (kept out of the HTML so the page works under a strict CSP). */
(function () {
  "use strict";

  var CDN_TIMEOUT_MS = 10000;
  var script = document.currentScript;
  var endpoint = (script && script.getAttribute("data-endpoint")) || "/api/chatkit/secret";
  var statusBox = document.getElementById("status");
  var chat = document.getElementById("chat");
  var unavailable = document.getElementById("chat-unavailable");
  var mintButton = document.getElementById("mint");
  var mintedList = document.getElementById("minted");
  var Secret = window.ChatKitSecret;

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

  if (!Secret) {
    showStatus("error", "chatkit-secret.js did not load, so this page cannot get a client secret.");
    return;
  }

  // --- the chat: <openai-chatkit> gets its secrets from the helper --------------------------
  var chatFetcher = Secret.createClientSecretFetcher({ endpoint: endpoint });
  var chatReady = false;

  async function chatGetClientSecret(currentClientSecret) {
    try {
      var secret = await chatFetcher(currentClientSecret);
      showStatus("ok", currentClientSecret ? "Chat session refreshed." : "Chat session started.");
      return secret;
    } catch (err) {
      showStatus("error", "The chat could not start: " + describe(err));
      throw err;
    }
  }

  function componentUnavailable() {
    if (chatReady || !unavailable.hidden) {
      return;
    }
    unavailable.hidden = false;
    chat.hidden = true;
    showStatus(
      "warning",
      "The ChatKit web component could not load (offline or no access to OpenAI): " +
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
      showStatus("error", "Chat error: " + describe(error) + "\nThe chat itself needs OpenAI's service.");
    });
    chat.setOptions({ api: { getClientSecret: chatGetClientSecret } });
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

  // --- the secret flow without the web component ---------------------------------------------
  var lastInfo = null;
  var currentSecret = null;
  var buttonFetcher = Secret.createClientSecretFetcher({
    endpoint: endpoint,
    onSecret: function (info) {
      lastInfo = info;
    },
  });

  mintButton.addEventListener("click", async function () {
    mintButton.disabled = true;
    showStatus("info", currentSecret ? "Refreshing: minting a new secret\u2026" : "Minting a secret\u2026");
    try {
      lastInfo = null;
      var secret = await buttonFetcher(currentSecret);
      var refreshed = currentSecret !== null;
      currentSecret = secret;
      var line = mask(secret) + "  " + expiry(lastInfo && lastInfo.expiresAt) + (refreshed ? "  (refresh)" : "");
      var item = document.createElement("li");
      item.textContent = line;
      mintedList.appendChild(item);
      showStatus("ok", "Minted " + line);
    } catch (err) {
      showStatus("error", describe(err));
    } finally {
      mintButton.disabled = false;
    }
  });

  window.chatkitDemo = { getClientSecret: buttonFetcher, chatGetClientSecret: chatGetClientSecret };
})();
