//! Configuration in layers, the same way in both binaries: defaults, then
//! a TOML file, then environment variables, then flags. Each layer sets
//! only the fields it names.
//!
//! A field is declared once, on a struct that derives `serde::Deserialize`
//! (the TOML name) and `clap::Args` (the flag, `--` and the name in kebab
//! case). Its environment variable is derived from the flag by the binary's
//! naming rule. clap reads the environment through the map it is given
//! here, never the process's own, so that tests pass theirs in.
//!
//! Layering relies on clap's `update_from_arg_matches`, which changes a
//! field only when its argument has a value: [`prepare`] therefore removes
//! every implicit value (a `bool` flag's `false`) and every `required`.

use clap::{ArgAction, ArgMatches, Command, FromArgMatches};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment a binary reads its configuration from, passed in.
pub type Environment = BTreeMap<String, String>;

/// The process's environment, for `main`. Variables that are not UTF-8
/// are left out.
pub fn process_environment() -> Environment {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

/// Reads a TOML file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = read_text(path)?;
    parse_toml(path, &text)
}

/// Reads a file's text, the error naming the file.
pub fn read_text(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses TOML `text` read from `path`.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    toml::from_str(text).map_err(|source| FileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// An argument or environment variable that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A flag (or `--help`, `--version`): clap prints and exits with it.
    #[error("{0}")]
    Flags(clap::Error),
    #[error("{variable}: {message}")]
    Environment { variable: String, message: String },
}

/// Makes the arguments of a config struct's derive layerable: none is
/// required, and a `bool` is `--name` (true) or `--name=false`, with no
/// value unless given.
pub fn prepare(command: Command) -> Command {
    command.mut_args(|arg| {
        let arg = arg.required(false);
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            arg.action(ArgAction::Set)
                .num_args(0..=1)
                .default_missing_value("true")
                .require_equals(true)
        } else {
            arg
        }
    })
}

/// The flags of `command` that can be set: every argument with a long
/// name but `--help` and `--version`.
pub fn settable_flags(command: &Command) -> Vec<String> {
    command
        .get_arguments()
        .filter(|arg| !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version))
        .filter_map(|arg| arg.get_long().map(str::to_string))
        .collect()
}

/// The arguments given by the environment and by the command line.
pub struct Layers {
    pub environment: ArgMatches,
    pub flags: ArgMatches,
}

impl Layers {
    /// Parses `args` (the program name first) and, as flags of their own,
    /// the variables of `env` that `env_name` gives a flag of `command`.
    pub fn parse(
        command: &Command,
        args: impl IntoIterator<Item = OsString>,
        env: &Environment,
        env_name: impl Fn(&str) -> String,
    ) -> Result<Layers, ArgsError> {
        let flags = command
            .clone()
            .try_get_matches_from(args)
            .map_err(ArgsError::Flags)?;
        let mut from_env = vec![OsString::from(command.get_name())];
        for flag in settable_flags(command) {
            let variable = env_name(&flag);
            let Some(value) = env.get(&variable) else {
                continue;
            };
            let arg = OsString::from(format!("--{flag}={value}"));
            // One at a time first, so that an error names its variable.
            if let Err(error) = command
                .clone()
                .try_get_matches_from([from_env[0].clone(), arg.clone()])
            {
                return Err(ArgsError::Environment {
                    variable,
                    message: first_line(&error),
                });
            }
            from_env.push(arg);
        }
        let environment = command
            .clone()
            .try_get_matches_from(from_env)
            .map_err(|error| ArgsError::Environment {
                variable: "environment".into(),
                message: first_line(&error),
            })?;
        Ok(Layers { environment, flags })
    }

    /// Sets on `target` what the environment names, then what the flags
    /// name.
    pub fn apply<T: FromArgMatches>(&self, target: &mut T) -> Result<(), ArgsError> {
        target
            .update_from_arg_matches(&self.environment)
            .map_err(|error| ArgsError::Environment {
                variable: "environment".into(),
                message: first_line(&error),
            })?;
        target
            .update_from_arg_matches(&self.flags)
            .map_err(ArgsError::Flags)
    }
}

/// clap's message without its `error: ` prefix and usage lines.
fn first_line(error: &clap::Error) -> String {
    let text = error.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// Parses a flag's value as JSON, for fields that are tables or arrays of
/// tables in TOML.
pub fn json<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    serde_json::from_str(text)
}

/// Parses a flag's value as the serde name of a unit variant, for enums
/// that TOML spells in snake case.
pub fn variant<T: DeserializeOwned>(text: &str) -> Result<T, serde::de::value::Error> {
    T::deserialize(serde::de::value::StrDeserializer::new(text))
}

/// A listen address that may be switched off: an address, or `off` (or
/// nothing) for none. The flag, the variable and the file read it alike.
pub fn listen_or_off(text: &str) -> Result<Option<std::net::SocketAddr>, std::net::AddrParseError> {
    match text {
        "off" | "" => Ok(None),
        addr => addr.parse().map(Some),
    }
}

/// [`listen_or_off`] for a TOML file (`metrics_listen = "off"`).
pub fn deserialize_listen_or_off<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?;
    listen_or_off(text.as_deref().unwrap_or("off")).map_err(serde::de::Error::custom)
}

/// One row of a configuration reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub key: String,
    pub flag: String,
    pub variable: String,
    /// The default as JSON; `null` for unset.
    pub default: String,
    /// The first sentence of the flag's help.
    pub meaning: String,
}

/// A row for every field of `T`, as `command` (flags and help), `defaults`
/// (`T::default()` as JSON) and `env_name` describe it.
pub fn reference<T: DeserializeOwned>(
    command: &Command,
    defaults: &serde_json::Value,
    env_name: impl Fn(&str) -> String,
) -> Vec<Reference> {
    field_names::<T>()
        .iter()
        .map(|key| {
            let flag = key.replace('_', "-");
            let help = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(flag.as_str()))
                .and_then(|arg| arg.get_help())
                .map(|help| help.to_string())
                .unwrap_or_default();
            Reference {
                key: key.to_string(),
                variable: env_name(&flag),
                flag: format!("--{flag}"),
                default: defaults[*key].to_string(),
                meaning: help.replace('\n', " "),
            }
        })
        .collect()
}

/// Every field of `T` that is not settable from outside: one without a
/// flag `--field-name` in `command`, or whose environment variable
/// (`env_name` of its flag) is not read, or does not apply to `T`. Each
/// binary's tests ask for this to be empty.
pub fn unsettable_fields<T>(command: &Command, env_name: impl Fn(&str) -> String) -> Vec<String>
where
    T: DeserializeOwned + serde::Serialize + Default + FromArgMatches,
{
    /// A value a field's flag accepts: its default's, or any text where
    /// the default is unset.
    fn sample(value: &serde_json::Value) -> String {
        match value {
            serde_json::Value::Null => "x".into(),
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
                items.iter().map(sample).collect::<Vec<_>>().join(",")
            }
            other => other.to_string(),
        }
    }
    let flags = settable_flags(command);
    let defaults = serde_json::to_value(T::default()).unwrap_or_default();
    let program = [OsString::from(command.get_name())];
    let mut unsettable = Vec::new();
    for field in field_names::<T>() {
        let flag = field.replace('_', "-");
        if !flags.contains(&flag) {
            unsettable.push(format!("{field} has no --{flag}"));
            continue;
        }
        let variable = env_name(&flag);
        let read = [sample(&defaults[*field]), "[]".into(), "1".into()]
            .into_iter()
            .find_map(|value| {
                let env = Environment::from([(variable.clone(), value)]);
                Layers::parse(command, program.clone(), &env, &env_name).ok()
            });
        match read {
            Some(layers) if layers.environment.contains_id(field) => {
                if let Err(error) = layers.apply(&mut T::default()) {
                    unsettable.push(format!("{variable} does not apply: {error}"));
                }
            }
            Some(_) => unsettable.push(format!("{variable} is not read")),
            None => unsettable.push(format!("{variable} takes no value")),
        }
    }
    unsettable
}

/// The field names of a struct as serde reads them: its TOML keys.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields(Option<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(serde::de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Fields(None);
    let _ = T::deserialize(&mut fields);
    fields.0.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    #[derive(Debug, Default, PartialEq, serde::Deserialize, clap::Args)]
    #[serde(default)]
    struct Sample {
        #[arg(long)]
        count: u32,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        loud: bool,
        #[arg(long, value_delimiter = ',')]
        items: Vec<String>,
    }

    fn layers(args: &[&str], env: &[(&str, &str)]) -> Result<Layers, ArgsError> {
        let command = prepare(Sample::augment_args(Command::new("sample")));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Layers::parse(
            &command,
            std::iter::once("sample")
                .chain(args.iter().copied())
                .map(OsString::from),
            &env,
            |flag| format!("SAMPLE_{}", flag.replace('-', "_").to_uppercase()),
        )
    }

    fn from_file() -> Sample {
        toml::from_str("count = 3\nname = \"file\"\nloud = true\nitems = [\"a\"]").unwrap()
    }

    #[test]
    fn a_layer_sets_only_the_fields_it_names() {
        let mut sample = from_file();
        layers(&[], &[]).unwrap().apply(&mut sample).unwrap();
        assert_eq!(sample, from_file());
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let mut sample = from_file();
        layers(
            &["--count", "7", "--loud=false"],
            &[
                ("SAMPLE_COUNT", "5"),
                ("SAMPLE_NAME", "env"),
                ("SAMPLE_ITEMS", "b,c"),
            ],
        )
        .unwrap()
        .apply(&mut sample)
        .unwrap();
        assert_eq!(
            sample,
            Sample {
                count: 7,
                name: Some("env".into()),
                loud: false,
                items: vec!["b".into(), "c".into()],
            }
        );
        let mut sample = Sample::default();
        layers(&["--loud"], &[])
            .unwrap()
            .apply(&mut sample)
            .unwrap();
        assert!(sample.loud);
    }

    #[test]
    fn a_bad_variable_is_named() {
        let Err(ArgsError::Environment { variable, message }) =
            layers(&[], &[("SAMPLE_COUNT", "many")])
        else {
            panic!("accepted");
        };
        assert_eq!(variable, "SAMPLE_COUNT");
        assert!(message.contains("--count"), "{message}");
    }

    #[test]
    fn field_names_are_serde_s() {
        assert_eq!(field_names::<Sample>(), ["count", "name", "loud", "items"]);
        let command = prepare(Sample::augment_args(Command::new("sample")));
        assert_eq!(settable_flags(&command), ["count", "name", "loud", "items"]);
    }
}
