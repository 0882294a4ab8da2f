// Light or dark, applied before the body paints (a classic script, not a module, so it runs at once): the
// choice stored by the page's toggle, else the system's preference. app.js calls tandemTheme.set to switch.
"use strict";
window.tandemTheme = (function () {
  var KEY = "tandem.chat.theme";
  function apply(theme) {
    document.documentElement.dataset.theme = theme;
    // Both highlight.js styles are linked; only the one matching the page applies.
    var light = document.getElementById("code-light");
    var dark = document.getElementById("code-dark");
    if (light && dark) {
      light.disabled = theme === "dark";
      dark.disabled = theme !== "dark";
    }
  }
  var stored = null;
  try {
    stored = localStorage.getItem(KEY);
  } catch (error) {
    // storage off (a privacy mode): follow the system
  }
  var system = window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  apply(stored === "dark" || stored === "light" ? stored : system);
  return {
    get: function () { return document.documentElement.dataset.theme; },
    set: function (theme) {
      apply(theme);
      try { localStorage.setItem(KEY, theme); } catch (error) { /* kept for this page only */ }
    },
  };
})();
