# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_iotctl_global_optspecs
    string join \n config= h/help V/version
end

function __fish_iotctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_iotctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_iotctl_using_subcommand
    set -l cmd (__fish_iotctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c iotctl -n "__fish_iotctl_needs_command" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iotctl -n "__fish_iotctl_needs_command" -s V -l version -d 'Print version'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "status" -d 'Show what iotd is doing: state, thing, certificate, next rotation, key, connection, last error and what to do about it'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "check" -d 'Diagnose the gateway: configuration, TPM, key and certificate, clock, endpoint (DNS, TCP, TLS with the device identity), claim. Works while iotd is stopped'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "rotate" -d 'Ask iotd to replace the device certificate now: a new key, a new certificate over the production connection, committed once it connected (rolled back otherwise). Runs whatever the schedule and the clock say'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "reprovision" -d 'Ask iotd to abandon the identity and provision a new one, with a new key'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "config" -d 'Work with the configuration files'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "support-bundle" -d 'Collect what support needs into one text file, with secrets removed: configuration, status, checks, state, recent journal lines, versions'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "completions" -d 'Print a shell completion script'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "onboarding" -d 'Trusted-user onboarding: the setup code on this gateway\'s label, with which an installer hands it a claim'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "onboard" -d 'Onboard a gateway as its installer: hand it an AWS provisioning claim over its local onboarding endpoint, authenticated by the setup code on its label'
complete -c iotctl -n "__fish_iotctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iotctl -n "__fish_iotctl_using_subcommand status" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand status" -l json -d 'Print JSON with stable keys instead of text'
complete -c iotctl -n "__fish_iotctl_using_subcommand status" -l watch -d 'Keep running and print the status again whenever iotd\'s properties change (one JSON object per line with --json). Ends on Ctrl-C or when iotd stops'
complete -c iotctl -n "__fish_iotctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand check" -l dont-run -d 'Do not run the check with this id (repeatable; see --list for the ids)' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand check" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand check" -l json -d 'Print a JSON array of {id, description, result, message} instead of text'
complete -c iotctl -n "__fish_iotctl_using_subcommand check" -l warnings-as-errors -d 'Treat warnings as failures for the exit code'
complete -c iotctl -n "__fish_iotctl_using_subcommand check" -l list -d 'List the checks\' ids and descriptions and exit'
complete -c iotctl -n "__fish_iotctl_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iotctl -n "__fish_iotctl_using_subcommand rotate" -l timeout -d 'With --wait: how long to follow it, in seconds' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand rotate" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand rotate" -l wait -d 'Follow the rotation to its end: exit 0 when it committed, 1 when it failed (rolled back) or did not end in time'
complete -c iotctl -n "__fish_iotctl_using_subcommand rotate" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand reprovision" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand reprovision" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and not __fish_seen_subcommand_from check help" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and not __fish_seen_subcommand_from check help" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and not __fish_seen_subcommand_from check help" -f -a "check" -d 'Read, merge and validate the configuration iotd would use, list the files it is made of, and run the template parameter sources (files read, commands run; values are not shown). With FILE, check FILE and the `config.d/` beside it, as `iotd --config FILE` would read them'
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and not __fish_seen_subcommand_from check help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and __fish_seen_subcommand_from check" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and __fish_seen_subcommand_from check" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and __fish_seen_subcommand_from help" -f -a "check" -d 'Read, merge and validate the configuration iotd would use, list the files it is made of, and run the template parameter sources (files read, commands run; values are not shown). With FILE, check FILE and the `config.d/` beside it, as `iotd --config FILE` would read them'
complete -c iotctl -n "__fish_iotctl_using_subcommand config; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iotctl -n "__fish_iotctl_using_subcommand support-bundle" -s o -l output -d 'Where to write the bundle ("-" for standard output). Default: ./iotd-support-<UTC time>.txt' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand support-bundle" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand support-bundle" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand completions" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand completions" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -f -a "register" -d 'Make this gateway\'s setup code and store its verifier record; print the label once'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -f -a "open" -d 'Open the onboarding window, so that an installer can pair (root or iotd-admin)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -f -a "close" -d 'Close the onboarding window now (root or iotd-admin)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -f -a "status" -d 'Show whether the onboarding window is open, and until when'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and not __fish_seen_subcommand_from register open close status help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from register" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from register" -l replace -d 'Replace the existing registration with a new code; the old label\'s code stops working'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from register" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from open" -l for -d 'How long: seconds, or with a unit (90s, 10m); 1 s to 15 min' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from open" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from open" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from close" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from close" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from status" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from status" -l json -d 'Print JSON'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from help" -f -a "register" -d 'Make this gateway\'s setup code and store its verifier record; print the label once'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from help" -f -a "open" -d 'Open the onboarding window, so that an installer can pair (root or iotd-admin)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from help" -f -a "close" -d 'Close the onboarding window now (root or iotd-admin)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from help" -f -a "status" -d 'Show whether the onboarding window is open, and until when'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboarding; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l code -d 'The setup code on the gateway\'s label: 16 digits (XXXX-XXXX-XXXX-XXXX; spaces and hyphens are ignored). "-" reads it from the first line of standard input, which keeps it out of the process list' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l serial -d 'The serial on the gateway\'s label' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l qr -d 'The text of the label\'s QR code, IOTD1:<SERIAL>:<16 digits>, instead of --code and --serial ("-": the first line of standard input)' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l claim-cert -d 'The claim certificate, PEM (CreateProvisioningClaim\'s certificatePem)' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l claim-key -d 'The claim\'s private key, PEM (CreateProvisioningClaim\'s keyPair.PrivateKey)' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l template -d 'The provisioning template the gateway registers with (one its configuration allows; default: the gateway\'s configured template)' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l endpoint -d 'The AWS IoT endpoint the claim was made for (its account\'s and region\'s data endpoint, aws iot describe-endpoint --endpoint-type iot:Data-ATS), when it is not the gateway\'s configured one; the gateway\'s configuration must allow it (onboarding.allowed_endpoints), and its identity then belongs there' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l param -d 'A template parameter for the gateway\'s registration (repeatable), e.g. Site=Hamburg-3; only names the gateway\'s configuration lets an installer supply' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l binding -d 'What the pairing binds besides the code: the TLS certificate iotctl saw (tls-server-end-point), or nothing (none, as a browser must)' -r -f -a "tls-server-end-point\t'The SHA-256 of the gateway\'s TLS certificate, as iotctl saw it'
none\t'Nothing'"
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l timeout -d 'How long to wait, once the claim is handed over, for the gateway to be connected with its own identity, in seconds (the claim itself lives 5 minutes)' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l for -d 'With --discover: how long to listen for announcements, in seconds or with a unit (3s, 1m); 1 s to 5 min. Gateways answer within a second on a quiet network' -r
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l config -d 'Main configuration file, as for `iotd --config`: drop-ins are read from `config.d/` beside it. Default: /etc/iotd/config.toml with /usr/lib/iotd/config.d, /etc/iotd/config.d and /run/iotd/config.d' -r -F
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l json -d 'Print one JSON object per line for each step and event, and a final result object ({"result", "exit_code", ...}) instead of text. With --discover: one object, {"result", "exit_code", "gateways": [{"serial", "model", "host", "port", "address", "interface", "name", "txt"}]}'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -l discover -d 'Instead of onboarding a gateway, list the gateways on the local network whose onboarding window is open (DNS-SD _iotd-onboard._tcp, browsed through Avahi)'
complete -c iotctl -n "__fish_iotctl_using_subcommand onboard" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "status" -d 'Show what iotd is doing: state, thing, certificate, next rotation, key, connection, last error and what to do about it'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "check" -d 'Diagnose the gateway: configuration, TPM, key and certificate, clock, endpoint (DNS, TCP, TLS with the device identity), claim. Works while iotd is stopped'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "rotate" -d 'Ask iotd to replace the device certificate now: a new key, a new certificate over the production connection, committed once it connected (rolled back otherwise). Runs whatever the schedule and the clock say'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "reprovision" -d 'Ask iotd to abandon the identity and provision a new one, with a new key'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "config" -d 'Work with the configuration files'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "support-bundle" -d 'Collect what support needs into one text file, with secrets removed: configuration, status, checks, state, recent journal lines, versions'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "completions" -d 'Print a shell completion script'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "onboarding" -d 'Trusted-user onboarding: the setup code on this gateway\'s label, with which an installer hands it a claim'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "onboard" -d 'Onboard a gateway as its installer: hand it an AWS provisioning claim over its local onboarding endpoint, authenticated by the setup code on its label'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and not __fish_seen_subcommand_from status check rotate reprovision config support-bundle completions onboarding onboard help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and __fish_seen_subcommand_from config" -f -a "check" -d 'Read, merge and validate the configuration iotd would use, list the files it is made of, and run the template parameter sources (files read, commands run; values are not shown). With FILE, check FILE and the `config.d/` beside it, as `iotd --config FILE` would read them'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and __fish_seen_subcommand_from onboarding" -f -a "register" -d 'Make this gateway\'s setup code and store its verifier record; print the label once'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and __fish_seen_subcommand_from onboarding" -f -a "open" -d 'Open the onboarding window, so that an installer can pair (root or iotd-admin)'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and __fish_seen_subcommand_from onboarding" -f -a "close" -d 'Close the onboarding window now (root or iotd-admin)'
complete -c iotctl -n "__fish_iotctl_using_subcommand help; and __fish_seen_subcommand_from onboarding" -f -a "status" -d 'Show whether the onboarding window is open, and until when'
