//! `#[derive(OptionDocs)]`: a stage's option documentation, read off the doc comments of its
//! options struct.
//!
//! Why a derive: the documentation `backflow stages` prints (and the README's stage table) used to
//! be a second list beside each options struct, and the two drifted. With the derive the field's
//! doc comment is the only text; a field without one is a compile error, so an undocumented
//! option cannot ship. Defaults are not read here: the catalog serialises the struct's `Default`.
//!
//! The generated impl is of `backflow_pipeline::describe::OptionDocs`; the derive is re-exported
//! there, so stage crates need no dependency on this crate.

use proc_macro::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Expr, ExprLit, Fields, Lit, Meta, parse_macro_input};

#[proc_macro_derive(OptionDocs)]
pub fn derive_option_docs(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            name,
            "OptionDocs documents the fields of an options struct",
        ));
    };
    let mut entries = Vec::new();
    if let Fields::Named(fields) = &data.fields {
        for field in &fields.named {
            let ident = field.ident.as_ref().expect("named field");
            let option = ident.to_string().trim_start_matches("r#").to_owned();
            let doc = doc_text(&field.attrs);
            if doc.is_empty() {
                return Err(syn::Error::new_spanned(
                    ident,
                    format!(
                        "option `{option}` has no doc comment: it is what `backflow stages` prints"
                    ),
                ));
            }
            entries.push(quote! { (#option, #doc) });
        }
    }
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::backflow_pipeline::describe::OptionDocs for #name #ty_generics #where_clause {
            const OPTION_DOCS: &'static [(&'static str, &'static str)] = &[#(#entries),*];
        }
    })
}

/// The doc comment's lines joined into one paragraph, as a table cell holds it.
fn doc_text(attrs: &[syn::Attribute]) -> String {
    let mut lines = Vec::new();
    for attr in attrs {
        if let Meta::NameValue(nv) = &attr.meta
            && nv.path.is_ident("doc")
            && let Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) = &nv.value
        {
            lines.push(s.value().trim().to_owned());
        }
    }
    lines.retain(|l| !l.is_empty());
    lines.join(" ")
}
